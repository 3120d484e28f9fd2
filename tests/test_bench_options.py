"""The bench's flags for train.py's speed options (--compile-scope, --cuda-graphs, --fused-rms-norm,
--compute-dtype-modulation, --compile-cache-dir, --compile-backend): passed to the config and to
SD3Policy.speed_options as train.py passes them, refused where train.py refuses them (named with the bench's flags),
and counted by the census as a GPU runs them (the fused RMS norm's Triton kernels as one op each way)."""

import json
import re

import pytest
import torch

from fdfo import bench
from fdfo.bench import cli, epoch


def setup(args):
    """epoch.prepare's Setup without its FLOP count (seconds the build does not need)."""
    cfg = epoch.bench_config(args)
    return epoch.Setup(torch.device("cpu"), cfg, epoch.batch_geometry(cfg, 1), [], {}, {})


def test_the_options_reach_the_config_and_speed_options_as_train_py_passes_them(monkeypatch, tmp_path):
    from fdfo.models.sd3 import SD3Policy

    calls = []
    monkeypatch.setattr(SD3Policy, "speed_options", lambda self, *a: calls.append(a))
    loaded = []
    monkeypatch.setattr(epoch.compile_cache, "load_cache", lambda folder: loaded.append(folder) or False)
    args = cli.parse_args(["--tiny", "--compile", "--compile-scope", "transformer", "--fused-rms-norm",
                           "--compute-dtype-modulation", "--compile-cache-dir", str(tmp_path / "cache"),
                           "--compile-backend", "eager"])
    cfg = bench.bench_config(args)
    t = cfg.train
    assert (t.compile, t.compile_scope, t.cuda_graphs, t.fused_rms_norm, t.compute_dtype_modulation) == (
        True, "transformer", False, True, True)
    epoch.build(args, setup(args))
    # fdfo/train_loop.py setup: speed_options(compile, gradient_checkpointing, compile_scope, fused_rms_norm,
    # compute_dtype_modulation); the bench adds only the backend it was asked for
    assert calls == [(True, False, "transformer", True, True, "eager")]
    assert loaded == [tmp_path / "cache"]
    plain = epoch.bench_config(cli.parse_args(["--tiny"])).train
    assert (plain.compile_scope, plain.cuda_graphs, plain.fused_rms_norm, plain.compute_dtype_modulation) == (
        "blocks", False, False, False)


def test_the_options_change_the_tiny_benchs_model(monkeypatch, tmp_path):
    from fdfo.fused import ComputeDtypeLayerNorm, FusedRMSNorm

    args = cli.parse_args(["--tiny", "--fused-rms-norm", "--compute-dtype-modulation"])
    models = epoch.build(args, setup(args))
    kinds = [type(m) for m in models.policy.pipe.transformer.modules()]
    assert kinds.count(FusedRMSNorm) == 10 and ComputeDtypeLayerNorm in kinds  # tiny: 10 q / k RMS norms


REFUSED = [
    (["--tiny", "--cuda-graphs"], "--cuda-graphs on is invalid: it must be left out on cpu (CUDA graphs need a GPU)"),
    (["--cuda-graphs"], "--cuda-graphs on is invalid: it must be left out on cpu"),  # no CUDA on this machine
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs on is invalid: it must be left out on cpu"),
    (["--tiny", "--compile-scope", "transformer"],
     "--compile-scope transformer is invalid: it must be left out without --compile"),
    (["--tiny", "--compile-cache-dir", "c"], "--compile-cache-dir 'c' keeps compiled kernels: it needs --compile"),
    (["--tiny", "--compile-backend", "eager"], "--compile-backend eager says how --compile compiles: it needs"),
    (["--census", "--cuda-graphs"], "--cuda-graphs does not apply to it"),
    (["--census", "--compile-scope", "transformer"], "--compile-scope does not apply to it"),
]


def test_refused_where_train_py_refuses_them_with_the_bench_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(epoch, "run", lambda args: pytest.fail("the bench ran"))
    for flags, message in REFUSED:
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            bench.main(flags)
        assert "--train." not in str(error.value), flags
    # CUDA graphs with the options train.py refuses beside them (checked as if on a GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for flag, named in ((["--grad-checkpoint"], "--grad-checkpoint"), (["--compile"], "--compile"),
                        (["--rollout-device", "cpu"], "--rollout-device cpu")):
        with pytest.raises(ValueError, match=f"--cuda-graphs on is invalid: it must be left out with {named} "):
            cli.parse_args(["--cuda-graphs", *flag])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--compile-cache-dir .* is a file; give a folder path"):
        bench.main(["--tiny", "--compile", "--compile-cache-dir", str(tmp_path / "file")])


def rms_norm_call_kernels() -> int:
    """Kernels of one diffusers RMSNorm call as SD3.5-M's attention makes it (fp16 queries, bf16 weight), under
    CUDA autocast on fake cuda:0 tensors: counted by the census's own counter on the module alone."""
    from diffusers.models.normalization import RMSNorm
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fdfo.bench.dispatch import CudaOnCpuBuild, OpCounter, cuda_autocast, to_fake

    fake = FakeTensorMode()
    with torch.device("meta"):
        norm = RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    to_fake(norm, fake, torch.device("cuda:0"))
    with fake:
        x = torch.empty(12, 16, 2, 16, dtype=torch.float16, device="cuda:0")  # [B, S, H, D] queries
        with torch.no_grad(), cuda_autocast(torch.float16), CudaOnCpuBuild(), OpCounter() as counter:
            norm(x)
    return sum(op.kernel for op in counter.ops)


@pytest.fixture(scope="module")
def tiny_censuses(tmp_path_factory):
    out = tmp_path_factory.mktemp("census")
    records = {}
    for name, flags in (("default", []), ("fused", ["--fused-rms-norm"])):
        cli.main(["--census", "--tiny", *flags, "--out", str(out / f"{name}.json")])
        records[name] = json.loads((out / f"{name}.json").read_text())
    return records


def test_the_census_counts_the_fused_rms_norm_as_one_kernel_each_way(tiny_censuses):
    from fdfo.bench.census import sample_forward

    default, fused = tiny_censuses["default"], tiny_censuses["fused"]
    assert fused["options"] == ["fused_rms_norm"] and default["options"] == []
    assert fused["emulation_check"]["same_sequence"]
    per_call = rms_norm_call_kernels()
    assert per_call == 8  # docs/performance.md: 8 kernels forward
    norms = 10  # the tiny model: the first block's 2 attentions (q, k, added q, added k; q, k), the last block's 4
    s, f = default["sample_forward"], fused["sample_forward"]
    assert s["kernel_ops"] - f["kernel_ops"] == norms * (per_call - 1)
    assert f["by_kind"]["norm"]["ops"] - s["by_kind"]["norm"]["ops"] == norms
    ops = [op for op in sample_forward(True, "fp16", True, None, {"fused_rms_norm": True}) if op.kernel]
    forward = [op for op in ops if op.name == "fdfo_census.triton_rms_norm_forward.default"]
    assert len(forward) == norms and all(op.kind == "norm" for op in forward)
    # what the kernel reads and writes: x (fp16) and the bf16 weight; y (bf16) and one fp32 rstd per row
    rows, width = 12 * 16 * 2, 16  # the image tokens' queries: [12 rows, 16 tokens, 2 heads, 16]
    assert {op.nbytes for op in forward if op.inputs[0][1] == (12, 16, 2, 16)} == {
        rows * width * 2 + width * 2 + rows * width * 2 + rows * 4}
    t, tf = default["train_micro_batch"], fused["train_micro_batch"]
    backward = tf["backward"]["by_kind"]["norm"]["ops"] - t["backward"]["by_kind"]["norm"]["ops"]
    assert 0 < backward <= norms and tf["backward"]["kernel_ops"] < t["backward"]["kernel_ops"]


def test_the_census_micro_batch_is_train_pys_with_its_statistics_and_a_running_scaler():
    """train.py's training set has `ratio_dev` (written by each micro-batch: one index_put_), and its grad scaler's
    scale exists after the first micro-batch: the census counts neither as missing nor as made again."""
    from fdfo.bench.census import train_micro_batch

    ops = train_micro_batch(True, "fp16")
    after = ops[max(i for i, op in enumerate(ops) if op.backward) + 1:]
    assert [op.name for op in after].count("aten.index_put_.default") == 1
    assert not any(op.name == "aten.full.default" for op in ops)  # the scale and growth tracker: made once per run
