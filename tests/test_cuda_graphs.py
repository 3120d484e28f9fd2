"""--train.cuda-graphs (fdfo/cuda_graphs.py): everything but the capture runs on a CPU. The static-buffer path (the
rows copied into one device buffer, gradients kept between steps) trains bit for bit like the default path, under
DDP the micro-batch that all-reduces runs eagerly through the wrapper and the others on the bare model, and a CPU run
is refused before anything loads. The capture itself is compared with eager on a GPU (marked gpu, not yet run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo import cuda_graphs, phases
from fdfo.config import batch_geometry, check_config
from fdfo.runlog import NullLogger
from fdfo.train_loop import build_policy, build_reward_model
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple", "a blue boat", "a green tree", "a yellow sun"]


def _config(tmp_path, cuda_graphs):
    cfg = tiny_config(tmp_path)
    cfg.train.batch_size = 2  # 12 items per optimizer step: 6 micro-batches, 2 steps
    cfg.train.cuda_graphs = cuda_graphs
    return cfg


def _train(tmp_path, cuda_graphs, wrap=None):
    """One epoch's training phase on the tiny model; returns what it changed and how the micro-batches ran."""
    cfg = _config(tmp_path, cuda_graphs)
    geom = batch_geometry(cfg, 1)
    device = torch.device("cpu")
    policy = build_policy(cfg, device)
    samples = phases.sample_phase(policy, build_reward_model(cfg, device), cfg, geom, 0, PROMPTS, 0)
    data = phases.build_training_set(samples, cfg, geom, 0)
    policy.transformer.train()
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen, grads = [], []

    def micro_batch(policy, module, scaler, data, ids, cfg, step_size):
        seen.append((ids, module))
        return phases._micro_batch(policy, module, scaler, data, ids, cfg, step_size)

    def after_step():
        grads.append([None if p.grad is None else p.grad.data_ptr() for p in params])

    module = wrap(policy.transformer) if wrap else policy.transformer
    _, records = phases.train_phase(policy, module, optimizer, scaler, data, cfg, geom, 0, NullLogger(), 0,
                                    micro_batch, after_step)
    return dict(params=[p.detach().clone() for p in params], records=records, ratio_dev=data.ratio_dev,
                seen=seen, grads=grads, module=module)


def _assert_same_training(a, b):
    assert a["records"] == b["records"]
    assert torch.equal(a["ratio_dev"], b["ratio_dev"])
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))
    assert len(a["records"]) == 2 and a["records"][0]["loss"] != 0


def test_static_buffer_path_trains_like_the_default_path_bit_for_bit(tmp_path):
    default = _train(tmp_path / "default", False)
    static = _train(tmp_path / "static", True)
    _assert_same_training(default, static)
    # every micro-batch read its rows from one buffer (the default path gets a new slice each time)
    buffers = {ids.data_ptr() for ids, _ in static["seen"]}
    assert len(static["seen"]) == 12 and len(buffers) == 1
    assert len({ids.data_ptr() for ids, _ in default["seen"]}) > 1
    # the gradients stay the same tensors from step to step (zeroed, not freed), as a captured backward needs
    assert static["grads"][0] == static["grads"][1] and None not in static["grads"][0]
    assert all(g is None for g in default["grads"][0])


@pytest.fixture
def gloo_world_of_one(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_under_ddp_the_all_reducing_micro_batch_runs_eagerly(tmp_path, monkeypatch, gloo_world_of_one):
    from fdfo import distributed

    wrappers = []

    class Recorded(cuda_graphs.GraphedMicroBatch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wrappers.append(self)

    monkeypatch.setattr(phases, "GraphedMicroBatch", Recorded)

    def wrap(model):
        return distributed.wrap_ddp(model, torch.device("cpu"))

    default = _train(tmp_path / "default", False, wrap)
    graphed = _train(tmp_path / "graphed", True, wrap)
    _assert_same_training(default, graphed)
    (wrapper,) = wrappers
    assert wrapper.calls == (["static"] * 5 + ["eager"]) * 2  # the last of each step all-reduces
    ddp = graphed["module"]
    assert [module is ddp for _, module in graphed["seen"]] == ([False] * 5 + [True]) * 2
    assert all(module is ddp.module for _, module in graphed["seen"] if module is not ddp)


# ops that wait for the device (a value read back to the host, a data-dependent shape) or copy Python data to it:
# none may run inside a captured region
HOST_SYNCS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.unique",
              "aten.lift_fresh", "aten.repeat_interleave.Tensor")


def test_the_micro_batch_never_waits_for_the_device(tmp_path):
    """What a capture needs of the micro-batch, checked on the CPU op by op (CFG and the KL term on: the paths with
    the most Python around the model)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    cfg = _config(tmp_path, True)
    cfg.sample.guidance_scale, cfg.train.kl_weight = 4.5, 0.1
    geom, device = batch_geometry(cfg, 1), torch.device("cpu")
    policy = build_policy(cfg, device)
    samples = phases.sample_phase(policy, build_reward_model(cfg, device), cfg, geom, 0, PROMPTS, 0)
    data = phases.build_training_set(samples, cfg, geom, 0)
    policy.transformer.train()
    with Ops() as ops:
        phases._micro_batch(policy, policy.transformer, torch.amp.GradScaler("cpu", enabled=False), data,
                            data.steps[0][:2], cfg, 12)
    assert "aten.mm.default" in ops.seen or "aten.addmm.default" in ops.seen  # the mode saw the model's ops
    assert not [op for op in ops.seen if op.startswith(HOST_SYNCS)]


def test_all_reduces_only_outside_no_sync():
    class FakeDDP:
        require_backward_grad_sync = True

        def no_sync(self):
            pass

    ddp = FakeDDP()
    assert cuda_graphs.all_reduces(ddp)
    ddp.require_backward_grad_sync = False  # what DDP.no_sync sets
    assert not cuda_graphs.all_reduces(ddp)
    assert not cuda_graphs.all_reduces(torch.nn.Linear(1, 1))


def test_cuda_graphs_are_refused_on_a_cpu_before_anything_loads(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--train.cuda-graphs", "--device", "cpu",
                             "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --train.cuda-graphs on is invalid: it must be left out on cpu (CUDA graphs need a GPU)"]
    assert not run_dir.exists()


def test_cuda_graphs_refuse_the_options_they_do_not_support(tmp_path):
    cfg = _config(tmp_path, True)
    cfg.device = "cuda:0"  # checked as if on a GPU: only the combinations are refused
    check_config(cfg)
    cfg.train.rollout_device, cfg.train.compile, cfg.train.gradient_checkpointing = "cpu", True, True
    with pytest.raises(ValueError) as error:
        check_config(cfg)
    for flag in ("--train.rollout-device cpu", "--train.compile", "--train.gradient-checkpointing"):
        assert f"--train.cuda-graphs on is invalid: it must be left out with {flag} (not supported" in str(error.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_equals_eager_bit_for_bit_on_a_gpu(tmp_path):
    """fp16 autocast with the grad scaler, as the paper runs: two eager runs (to show the comparison is deterministic)
    and a graphed one; the adapters and the logged losses must be identical."""
    env = os.environ | {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.cuda_graphs_worker", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"][:3] == ["warmup", "warmup", "capture"] and set(report["calls"][3:]) == {"replay"}
    assert report["eager_repeatable"], "two eager runs differ: the GPU comparison cannot be bit for bit"
    assert report["graphed_equals_eager"], report
