"""`--train.compile`: torch.compile of the policy's transformer, regional (`blocks`) or whole (`transformer`), with the
batch dimension dynamic from the first compile, and a warm start from the compile caches kept in the run folder.

Graphs per epoch (dynamo's count): with `blocks`, one per block kind (SD3.5-M: dual-attention, plain, and the last,
context-pre-only block) and grad mode, 6 in all; with `transformer`, one per grad mode. The sampling batch, a smaller
last sampling batch and the training micro-batch share a graph: dimension 0 of every tensor entering a compiled
region is marked dynamic before the first call (`maybe_mark_dynamic`: a batch of 1 still gets a graph of its own, as
dynamo specialises sizes 0 and 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

SCOPES = ("blocks", "transformer")
CACHE_FILE = "compile-cache.bin"  # in the run folder: torch.compiler.save_cache_artifacts
DEFAULT_BACKEND = "inductor"


def compile_transformer(transformer: torch.nn.Module, scope: str = "blocks", backend: str | None = None,
                        blocks: list[torch.nn.Module] | None = None) -> None:
    """Compile the blocks (`blocks`: the policy's, default the transformer's `transformer_blocks`) or the whole
    transformer forward (`transformer`) in place.

    backend: torch.compile's, default DEFAULT_BACKEND (Inductor); "eager" / "aot_eager" let tests count graphs quickly.
    """
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {', '.join(SCOPES)}")
    import torch._dynamo

    # the blocks share one code object: allow a graph per block kind x grad mode (x a batch of 1), not the default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if blocks is None:
        blocks = list(transformer.transformer_blocks)
    for module in (blocks if scope == "blocks" else [transformer]):
        _compile_forward(module, backend or DEFAULT_BACKEND, inputs_require_grad=scope == "blocks")


def _compile_forward(module: torch.nn.Module, backend: str, inputs_require_grad: bool) -> None:
    """Replace `module.forward` by an eager wrapper that marks dimension 0 of its tensor arguments dynamic and calls
    the compiled forward (marking has to happen outside the compiled frame; the module, its names and its hooks stay).

    inputs_require_grad: in grad mode, pass a floating-point input that does not require a gradient as a detached
    leaf that does, so that the first block (whose inputs come from frozen layers) shares the graph of its kind instead
    of compiling one more; autograd then also computes the gradient of those inputs, a few small products that nobody
    reads (the LoRA gradients do not depend on it).
    """
    import torch._dynamo

    compiled = torch.compile(module.forward, backend=backend)

    def prepare(value):
        if not isinstance(value, torch.Tensor) or not value.ndim:
            return value
        if inputs_require_grad and torch.is_grad_enabled() and value.is_floating_point() and not value.requires_grad:
            value = value.detach().requires_grad_(True)  # detach: a leaf, not a view (dynamo guards a view's base)
        torch._dynamo.maybe_mark_dynamic(value, 0)
        return value

    def forward(*args, **kwargs):
        return compiled(*map(prepare, args), **{key: prepare(value) for key, value in kwargs.items()})

    module.forward = forward


def load_cache(run_dir: Path) -> bool:
    """Warm start: load the compile artifacts an earlier (or the interrupted) run saved into `run_dir`, so that
    Inductor finds its kernels instead of compiling them (dynamo still traces, in seconds). False when there are none;
    artifacts that do not load (another torch or GPU) are skipped with a warning, and everything compiles again."""
    from fdfo import distributed as dist

    path = Path(run_dir) / CACHE_FILE
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - a stale cache is not an error: the run compiles as if it were absent
        dist.warn0(f"--train.compile: {path} did not load ({e.__class__.__name__}: {e}); compiling from scratch")
        return False
    return True


def save_cache(run_dir: Path) -> bool:
    """Write this process's compile artifacts (all graphs compiled or loaded so far) to `run_dir` atomically; False
    when there is nothing to save (e.g. a backend that does not use Inductor)."""
    from fdfo.files import atomic_path

    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    with atomic_path(Path(run_dir) / CACHE_FILE, "the compile cache") as tmp:
        tmp.write_bytes(artifacts[0])
    return True
