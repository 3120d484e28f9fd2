"""Estimated training-activation memory: what autograd keeps from the forward of one micro-batch for its backward.

The transformer is rebuilt on the meta device (no weights, no GPU) and one training forward is run with a saved-tensor
hook that adds up every distinct storage autograd keeps, parameters excluded. Two things differ from a plain meta run:
- attention is counted as a fused kernel (flash / memory-efficient, what SDPA picks on a GPU) keeps it: q, k, v, the
  output and a float32 log-sum-exp per query, not the L x L probability matrices that the meta device's math path
  would keep (they would dominate the figure);
- `torch.autocast` does nothing on the meta device, so `AutocastEmulation` applies CUDA autocast's casting rules by
  hand: matmul-like ops run in the autocast dtype on cast copies, norms, softmax and reductions in float32. Autograd
  would keep the cast copies of the frozen base weights too (autocast caches casts only of weights that require
  grad), but the policy stores them in the autocast dtype (fdfo/models/sd3_speed.py), so it keeps none.
It leaves out the weights, gradients and optimizer state, temporaries that live within one op, and allocator
slack; the bench (`python -m fdfo.bench`) measures the real peak.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.overrides import TorchFunctionMode

# CUDA autocast op lists (torch docs, "Autocast Op Reference"), as seen by a TorchFunctionMode: the public function
# or tensor-method names that the transformers and PEFT's LoRA layers reach.
LOWER_PRECISION_OPS = frozenset({"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "conv2d",
                                 "scaled_dot_product_attention"})
FLOAT32_OPS = frozenset({"layer_norm", "group_norm", "rms_norm", "softmax", "log_softmax", "pow", "__pow__",
                         "__rpow__", "exp", "log", "rsqrt", "reciprocal", "sum", "norm", "cumsum", "prod", "softplus",
                         "mse_loss", "__rtruediv__", "__rdiv__"})


def _cast(value, dtype: torch.dtype):
    """Floating tensors (not float64) in `value` (nested lists / tuples too) cast to `dtype`, as autocast does."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _cast_arguments(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """`_cast` of every argument, last first, as autocast's C++ kernels evaluate them (a compiler's choice that GCC
    makes right to left; the kernel census, fdfo/bench/census.py, checks the order against the real kernels)."""
    kwargs = dict(reversed([(k, _cast(v, dtype)) for k, v in reversed(kwargs.items())]))
    return tuple(reversed([_cast(v, dtype) for v in reversed(args)])), kwargs


class FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that keeps what a fused GPU kernel keeps: q, k, v, out and a float32 log-sum-exp
    `[B, H, Lq]`. Only for counting on the meta device: the output is uninitialised."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def fused_attention(*args, **kwargs) -> torch.Tensor:
    """`scaled_dot_product_attention(q, k, v, ...)` as `FusedAttention` counts it; q, k, v given by position (SD3's
    attention) or by name (query=, key=, value=: FLUX's attention dispatch)."""
    q, k, v = (*args, *(kwargs[name] for name in ("query", "key", "value")[len(args):]))[:3]
    return FusedAttention.apply(q, k, v)


class AutocastEmulation(TorchFunctionMode):
    """Autocast's casting rules on meta or fake tensors (dtype None: no autocast), and attention as `attention`
    (default `FusedAttention`; the kernel census, fdfo/bench/census.py, passes the cuDNN kernels).

    The op lists default to CUDA's; tests pass CPU autocast's to compare with a real CPU run."""

    def __init__(self, dtype: torch.dtype | None, lower_ops=LOWER_PRECISION_OPS, float32_ops=FLOAT32_OPS,
                 attention=None):
        super().__init__()
        self.dtype, self.lower_ops, self.float32_ops = dtype, lower_ops, float32_ops
        self.attention = attention or fused_attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None and name in self.lower_ops:
            args, kwargs = _cast_arguments(args, kwargs, self.dtype)
        elif self.dtype is not None and name in self.float32_ops:
            args, kwargs = _cast_arguments(args, kwargs, torch.float32)
        if name == "scaled_dot_product_attention":
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)


@dataclasses.dataclass
class SavedTensorCount:
    """Bytes of distinct storages autograd saved, split into outside the transformer blocks and per block, plus the
    blocks' inputs (what gradient checkpointing keeps instead of a block's activations)."""

    outside: int = 0
    per_block: list[int] = dataclasses.field(default_factory=list)
    block_inputs: int = 0

    def total(self, checkpointing: bool) -> int:
        """Without checkpointing everything is kept; with it (one block at a time recomputed in the backward) the
        blocks' inputs plus the largest block."""
        if not checkpointing:
            return self.outside + sum(self.per_block)
        return self.outside + self.block_inputs + max(self.per_block, default=0)


def count_saved(module: torch.nn.Module, blocks: list[torch.nn.Module], run) -> SavedTensorCount:
    """Run `run()` (a forward of `module`) and count the storages autograd saves, attributed to the block whose
    forward was running (or to `outside`). Storages of `module`'s parameters and buffers are not counted."""
    skip = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}
    seen: set[int] = set()  # storages saved so far
    inputs_seen: set[int] = set()  # storages passed into a block so far (temb goes into every block: counted once)
    count = SavedTensorCount(per_block=[0] * len(blocks))
    current: list[int | None] = [None]

    def add(t: torch.Tensor, block: int | None) -> None:
        storage = t.untyped_storage()
        if storage._cdata in skip or storage._cdata in seen:
            return
        seen.add(storage._cdata)
        if block is None:
            count.outside += storage.nbytes()
        else:
            count.per_block[block] += storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(t, current[0])
        return t

    def enter(index: int):
        def hook(_module, args, kwargs):
            current[0] = index
            for t in (*args, *kwargs.values()):
                key = t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None
                if key is not None and key not in skip and key not in inputs_seen:
                    inputs_seen.add(key)
                    count.block_inputs += t.untyped_storage().nbytes()
        return hook

    def leave(_module, _args, _output):
        current[0] = None

    handles = []
    for index, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(index), with_kwargs=True), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return count


def meta_model(model_class, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`model_class.from_config(config)` on the meta device in `dtype`, frozen (no weights, no memory)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no weights here, so its note on casting loaded weights does not apply
    try:
        with torch.device("meta"):
            return model_class.from_config(config).to(dtype).requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def saved_bytes(model: torch.nn.Module, blocks: list[torch.nn.Module], inputs: dict, amp_dtype: torch.dtype | None,
                checkpointing: bool, float32_ops: frozenset[str] | None = None) -> int:
    """Bytes autograd keeps for one training forward `model(**inputs)` (meta tensors) under the emulated autocast of
    `amp_dtype` (float32_ops: the ops it runs in float32; default CUDA's), with or without gradient checkpointing of
    `blocks` (what each model module's `activation_bytes` builds: fdfo/models/)."""
    def run():
        with AutocastEmulation(amp_dtype, float32_ops=FLOAT32_OPS if float32_ops is None else float32_ops):
            model(**inputs, return_dict=False)[0].float()

    return count_saved(model, blocks, run).total(checkpointing)


def training_activation_bytes(policy, cfg, geom) -> int:
    """The estimate for a run: `policy`'s transformer (fdfo/models/), its dtypes, the run's resolution, micro-batch,
    guidance, LoRA rank and gradient checkpointing."""
    return policy.activation_bytes(geom.train_batch, cfg.sample.resolution, cfg.lora_rank,
                                   cfg.train.gradient_checkpointing)


def activation_note(policy, cfg, geom) -> str:
    """One line for the start of a run: the estimated activation memory of one training micro-batch per rank."""
    nbytes = training_activation_bytes(policy, cfg, geom)
    return (f"training activations per rank: about {nbytes / 1e9:.3g} GB for a micro-batch of {geom.train_batch} "
            f"(estimate: saved tensors with fused attention; weights, optimizer state and allocator slack come on "
            f"top)")


def rollout_memory_note(policy, cfg, geom) -> str:
    """One line: the rollout memory each rank holds for training (states and velocities of its own items)."""
    from fdfo.phases import rollout_dtypes, rollout_gb_per_rank, timesteps_per_sample

    state_dtype, velocity_dtypes = rollout_dtypes(policy)
    state_bytes = torch.finfo(state_dtype).bits // 8
    # velocities are kept in 16 bits only when that is lossless: CFG rules it out unless it runs under autocast (where
    # the combination is computed in the 16-bit output dtype, fdfo/models/sd3.py)
    lossless = not policy.cfg or getattr(policy, "amp_dtype", None) is not None
    velocity_bytes = 2 if velocity_dtypes and lossless else 4
    latent = policy.latent_shape(cfg.sample.resolution)
    k = timesteps_per_sample(cfg)
    if cfg.algorithm != "fdfo":
        samples = cfg.samples_per_prompt * geom.pairs_per_gpu
        return f"rollouts of --algorithm {cfg.algorithm}: {samples} samples per rank"
    gb = rollout_gb_per_rank(geom, k, latent, state_bytes, velocity_bytes)
    return (f"rollout memory per rank: {gb:.3g} GB ({2 * geom.pairs_per_gpu} samples x {k} timesteps x "
            f"{'x'.join(map(str, latent))} latents x ({state_bytes} + {velocity_bytes}) bytes)")
