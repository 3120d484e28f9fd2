"""--train.compile (fdfo/compile.py): the graphs dynamo builds per epoch, counted with its own counters (one per
block kind and grad mode with `blocks`, one per grad mode with `transformer`, none for another batch size), the
compiled loss against eager, and the warm start from the run folder's compile cache. Graph counting uses the "eager"
and "aot_eager" backends (seconds); Inductor itself, whose C++ build takes minutes on a CPU, is marked slow."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fdfo import compile as compile_cache
from fdfo.config import check_config
from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import add_lora
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sd35m_layout(full_depth: bool = False):
    """SD3.5-Medium's blocks (dual attention in the first 13 of 24, a context-pre-only last block) at tiny widths,
    with the LoRA: the block kinds that decide the graph count, at the cost of a tiny model."""
    from diffusers import SD3Transformer2DModel

    config = dict(tiny.SD35M_TRANSFORMER_CONFIG, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                  caption_projection_dim=16, pooled_projection_dim=16, sample_size=8, pos_embed_max_size=16)
    if not full_depth:  # the same three block kinds in 5 blocks: dual attention in the first 2
        config |= dict(num_layers=5, dual_attention_layers=(0, 1))
    torch.manual_seed(0)
    base = SD3Transformer2DModel(**config).requires_grad_(False)
    model = add_lora(base, 4, 8)
    with torch.no_grad():  # a nonzero update, so that every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return base, model


def forward(model, rows: int, grad: bool):
    g = torch.Generator().manual_seed(rows)
    inputs = dict(hidden_states=torch.randn(rows, 16, 8, 8, generator=g), timestep=1000 * torch.rand(rows, generator=g),
                  encoder_hidden_states=torch.randn(rows, 10, 16, generator=g),
                  pooled_projections=torch.randn(rows, 16, generator=g), return_dict=False)
    model.train(grad)
    with torch.set_grad_enabled(grad):
        v = model(**inputs)[0]
    if grad:
        v.square().mean().backward()
    return v.detach()


# an epoch's calls: a sampling batch of 12 rows (6 pairs), training micro-batches of 6, a last sampling batch of 4
EPOCH = ((12, False), (6, True), (4, False), (6, True))


@pytest.mark.parametrize("scope,expected", [("blocks", 6), pytest.param("transformer", 2, marks=pytest.mark.slow)])
def test_one_graph_per_block_kind_and_grad_mode_whatever_the_batch(scope, expected):
    base, model = sd35m_layout()
    eager = [forward(model, rows, grad) for rows, grad in EPOCH]
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    compile_cache.compile_transformer(base, scope, backend="eager")
    compiled = [forward(model, rows, grad) for rows, grad in EPOCH]
    assert graphs() == expected and counters["frames"]["ok"] == expected
    for rows, grad in EPOCH:  # a second epoch compiles nothing
        forward(model, rows, grad)
    assert graphs() == expected
    # the wrapper (dynamic batch, inputs of the blocks requiring grad) changes no number: "eager" runs the same ops
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(2 * a, b) for a, b in zip(eager_grads, grads, strict=True))  # two epochs accumulated
    assert sum(bool((g != 0).any()) for g in grads) > len(grads) // 2


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_an_epoch_on_the_tiny_model_compiles_once_and_matches_eager(tmp_path, monkeypatch, backend):
    """The real phases (sample_phase, build_training_set, train_phase) of two epochs: 2 block kinds x 2 grad modes =
    4 graphs in epoch 0, none in epoch 1; the logged losses equal eager's with the "eager" backend (dynamo's graphs
    run the same ops) and within 1e-5 relative with aot_eager (AOT autograd's joint graph, as Inductor gets it)."""
    from fdfo import train_loop

    losses = {}
    for name, compiled in (("reference", False), ("compiled", True)):
        cfg = tiny_config(tmp_path / name, num_epochs=3, save_freq=100)  # two epochs run here, no checkpoint
        cfg.train.compile = compiled
        counts, locks = [], []
        monkeypatch.setattr(compile_cache, "DEFAULT_BACKEND", backend)
        try:
            run = train_loop.setup(cfg, locks)
            for _ in range(2):
                train_loop.run_epoch(run)
                counts.append(graphs())
            run.logger.close()
        finally:
            for lock in locks:
                lock.release()
        assert counts == ([4, 4] if compiled else [0, 0])
        losses[name] = _step_losses(tmp_path / name)
    assert len(losses["reference"]) == 4
    tolerance = dict(rtol=0, atol=0) if backend == "eager" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["reference"]), **tolerance)


def _step_losses(run_dir: Path) -> list[float]:
    from tests.test_train import read_log

    return [r["loss"] for r in read_log(run_dir) if "step" in r]


def test_compile_scope_needs_compile(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.compile_scope = "transformer"
    with pytest.raises(ValueError, match="--train.compile-scope transformer is invalid: it must be left out without"):
        check_config(cfg)
    cfg.train.compile = True
    check_config(cfg)


def test_warm_start_saves_and_loads_the_cache_through_the_run_folder(tmp_path, monkeypatch):
    """A compiled run writes torch.compiler's artifacts into its folder at each checkpoint (atomically), and a resumed
    run loads them before its first forward (where compiling starts); a stale file is skipped with a warning. The
    compile itself is stubbed out: only the run folder's plumbing is under test here."""
    from fdfo import phases, train_loop

    events = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts after epoch 1", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: events.append(("load", data)))
    monkeypatch.setattr(compile_cache, "compile_transformer", lambda *args: events.append("compile"))
    sample_phase = phases.sample_phase
    monkeypatch.setattr(train_loop, "sample_phase", lambda *args: events.append("sample") or sample_phase(*args))
    cfg = tiny_config(tmp_path / "run")
    cfg.train.compile = True
    train_loop.train(cfg)
    cache = tmp_path / "run" / compile_cache.CACHE_FILE
    assert cache.read_bytes() == b"artifacts after epoch 1" and events == ["compile", "sample"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [".lock"]
    events.clear()
    cfg.num_epochs = 2
    train_loop.train(cfg)
    assert events == ["compile", ("load", b"artifacts after epoch 1"), "sample"]

    def stale(data):
        raise RuntimeError("written by another torch")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", stale)
    assert not compile_cache.load_cache(tmp_path / "run")


@pytest.mark.slow
def test_inductor_warm_start_compiles_nothing_in_a_fresh_process(tmp_path):
    """Inductor for real: a process compiles and saves the artifacts; another one, with an empty Inductor cache, loads
    them and finds every graph in the cache (no miss)."""
    code = ("import sys, torch; from torch._dynamo.utils import counters; from fdfo import compile as c\n"
            "loaded = c.load_cache(sys.argv[1]) if sys.argv[2] == 'load' else None\n"
            "f = torch.compile(lambda x: (x.sin() * 2 + 1).sum(-1))\n"
            "f(torch.randn(4, 8))\n"
            "if sys.argv[2] == 'save': c.save_cache(sys.argv[1])\n"
            "print(loaded, counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])")
    outputs = []
    for step in ("save", "load"):
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{step}"), "OMP_NUM_THREADS": "1",
               "PATH": "/usr/bin:/bin"}
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path), step], cwd=ROOT, capture_output=True,
                                text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.split())
    assert outputs == [["None", "0", "1"], ["True", "1", "0"]]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "transformer"])
def test_inductor_velocity_and_gradients_match_eager(scope):
    """Inductor's kernels on the tiny SD3 (fp32, CPU): velocity and LoRA gradients within 1e-4 of eager."""
    from tests.test_speed_options import _assert_same, _policy, _velocity_and_grads

    _assert_same(_velocity_and_grads(_policy()),
                 _velocity_and_grads(_policy(compile_blocks=True, compile_scope=scope)), 1e-4)
