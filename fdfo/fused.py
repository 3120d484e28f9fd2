"""Opt-in kernels that move rounding (docs/algorithm.md, "Differences from the authors' code"), off by default.

- `--train.fused-rms-norm`: diffusers' RMSNorm (the q / k norms of every attention) as one kernel each way on CUDA
  (Triton, fdfo/fused_triton.py) instead of about 8 forward and 14 backward kernels. The forward keeps diffusers'
  rounding points: fp32 inside, `x * rsqrt(mean(x^2) + eps)` rounded to the weight's 16-bit dtype, times the weight,
  rounded again; only the variance is summed in another order (a pairwise tree, as a GPU block reduction does). The
  backward is computed in fp32 and rounded once to the input dtype (autograd rounds after several of its steps).
- `--train.compute-dtype-modulation`: each LayerNorm's fp32 output (autocast runs layer_norm in fp32) is rounded to
  the autocast dtype at once, so the modulation `norm(x) * (1 + scale) + shift` after it multiplies and adds in fp16
  / bf16 instead of fp32, and the projections after it need no cast of their own. Without autocast it does nothing.

Both change the model's module classes in place (parameters, names and state dicts stay), so sampling and training
run the same arithmetic and the SPO ratio at theta = old stays exactly 1. On a CPU, and on CUDA without Triton, the
RMS norm runs the pure-torch `_ReferenceRMSNorm` (same arithmetic as the Triton kernel, up to the summation order
inside a row, but no fewer kernels).
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm

HALF = (torch.float16, torch.bfloat16)


def apply_numerics_options(transformer: torch.nn.Module, fused_rms_norm: bool = False,
                           compute_dtype_modulation: bool = False) -> dict[str, int]:
    """Swap the classes of the transformer's RMS norms / LayerNorms; returns how many modules each option changed."""
    changed = {"fused_rms_norm": 0, "compute_dtype_modulation": 0}
    for module in transformer.modules():
        if fused_rms_norm and type(module) is RMSNorm:
            if module.bias is not None:  # SD3's q / k norms have none; a bias would be a rounding point not modelled
                raise NotImplementedError("--train.fused-rms-norm: an RMSNorm with a bias is not supported")
            module.__class__ = FusedRMSNorm
            changed["fused_rms_norm"] += 1
        elif compute_dtype_modulation and type(module) is torch.nn.LayerNorm:
            module.__class__ = ComputeDtypeLayerNorm
            changed["compute_dtype_modulation"] += 1
    return changed


class ComputeDtypeLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm whose output is rounded to the autocast dtype (SD3: every LayerNorm is followed by a modulation).

    Under autocast the norm itself runs in fp32, as CUDA autocast runs layer_norm (CPU autocast would run it in the
    input's dtype); without autocast this is nn.LayerNorm exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            weight, bias = (None if t is None else t.float() for t in (self.weight, self.bias))
            out = torch.nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(torch.get_autocast_dtype(device))


class FusedRMSNorm(RMSNorm):
    """diffusers' RMSNorm through `rms_norm` (same parameters and state dict)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps)


def output_dtype(x_dtype: torch.dtype, weight: torch.Tensor | None) -> torch.dtype:
    """diffusers' RMSNorm output dtype: the input's without a weight, a 16-bit weight's, else fp32 promotion."""
    if weight is None:
        return x_dtype
    if weight.dtype in HALF:
        return weight.dtype
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), weight.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dimension with diffusers' rounding points (module docstring); Triton on CUDA."""
    if weight is not None and weight.requires_grad:
        raise NotImplementedError("--train.fused-rms-norm: the norm weights must be frozen (only the LoRA trains)")
    if x.is_cuda and not torch.compiler.is_compiling():  # a compiled graph fuses the reference ops itself
        from fdfo import fused_triton

        if fused_triton.available():
            return fused_triton.TritonRMSNorm.apply(x, weight, eps)
    return _ReferenceRMSNorm.apply(x, weight, eps)


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension as a pairwise tree (halves added until one is left), `[..., D] -> [..., 1]`:
    the order of a GPU block reduction, not torch's. Zero padding to a power of two adds exact zeros."""
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


class _ReferenceRMSNorm(torch.autograd.Function):
    """The pure-torch RMS norm: forward with diffusers' rounding points, backward in fp32 with one final rounding."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(tree_sum(xf * xf) / x.shape[-1] + eps)  # [..., 1]
            y = xf * rstd
            if weight is None:
                out = y.to(x.dtype)
            elif weight.dtype in HALF:
                out = y.to(weight.dtype) * weight
            else:
                out = (y * weight).to(output_dtype(x.dtype, weight))
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            gy = grad.float() if weight is None else grad.float() * weight.float()
            y = x.float() * rstd
            # d/dx of x * rstd(x): rstd * (gy - y * mean(gy * y)), the mean over the normalised dimension
            dx = rstd * (gy - y * (tree_sum(gy * y) / x.shape[-1]))
        return dx.to(x.dtype), None, None
