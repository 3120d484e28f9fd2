"""How far --train.fused-rms-norm and --train.compute-dtype-modulation move the velocity, measured on a CPU with the
GPU's arithmetic emulated (docs/algorithm.md, "Differences"): fp16 autocast over weights holding bf16 values, the RMS
norms' weights in bf16 (their outputs are rounded to bf16 as on the GPU, then handed on in fp32: CPU autocast's `cat`
refuses bf16 under fp16 autocast, CUDA's does not promote; attention casts either to the same fp16 values), and CUDA
autocast's rule for layer_norm (computed in fp32, output fp32), which CPU autocast does not follow. Used by
tests/test_fused.py on the tiny model; SD3.5-M's shapes with random weights (about 10 GB of memory, minutes):

    python -m tests.numerics_options --sd35m --resolution 128
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from diffusers.models.normalization import RMSNorm

from fdfo import fused


class CudaAutocastLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm as CUDA autocast runs it: fp32 input, fp32 output."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, None, None, self.eps)


class Bf16RMSNorm(RMSNorm):
    """diffusers' RMSNorm over its bf16 weight, the bf16 output handed on in fp32 (same values)."""

    def forward(self, x):
        return super().forward(x).float()


class FusedBf16RMSNorm(RMSNorm):
    """--train.fused-rms-norm's arithmetic, likewise."""

    def forward(self, x):
        return fused.rms_norm(x, self.weight, self.eps).float()


def gpu_like_(transformer: torch.nn.Module) -> torch.nn.Module:
    """In place: every float parameter and buffer rounded to bf16 (the RMS norms' weights stored in bf16), the
    LayerNorms following CUDA autocast's fp32 rule."""
    with torch.no_grad():
        for tensor in (*transformer.parameters(), *transformer.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16))
    for module in transformer.modules():
        if type(module) is RMSNorm and module.weight is not None:
            module.to(torch.bfloat16)
            module.__class__ = Bf16RMSNorm
        elif type(module) is torch.nn.LayerNorm:
            module.__class__ = CudaAutocastLayerNorm
    return transformer


@contextlib.contextmanager
def options(transformer: torch.nn.Module, fused_rms_norm: bool, compute_dtype_modulation: bool):
    """The options switched on for the block, on a `gpu_like_` model, and off again (classes swapped back)."""
    swapped = []
    for module in transformer.modules():
        if fused_rms_norm and type(module) is Bf16RMSNorm:
            swapped.append((module, Bf16RMSNorm))
            module.__class__ = FusedBf16RMSNorm
        elif compute_dtype_modulation and type(module) is CudaAutocastLayerNorm:
            swapped.append((module, CudaAutocastLayerNorm))
            module.__class__ = fused.ComputeDtypeLayerNorm
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def velocity(transformer, inputs: dict, amp_dtype=torch.float16) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        return transformer(**inputs, return_dict=False)[0].float()


def relative_changes(transformer, inputs: dict) -> dict[str, float]:
    """Relative RMS of each option's velocity change against the default arithmetic (fp16 autocast), and, for scale,
    of the default's own change against fp32 (no autocast)."""
    def rel(a, b):
        return float((a - b).square().mean().sqrt() / b.square().mean().sqrt())

    default = velocity(transformer, inputs)
    out = {"fp16_default_vs_fp32": rel(default, velocity(transformer, inputs, None))}
    for name, flags in (("fused_rms_norm", (True, False)), ("compute_dtype_modulation", (False, True)),
                        ("both", (True, True))):
        with options(transformer, *flags):
            out[name] = rel(velocity(transformer, inputs), default)
    return out


def random_inputs(transformer, rows: int, latent_side: int, text_tokens: int = 205, seed: int = 0) -> dict:
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, config.in_channels, latent_side, latent_side, generator=g),
                timestep=1000 * torch.linspace(0.9, 0.3, rows),
                encoder_hidden_states=torch.randn(rows, text_tokens, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=g))


def tiny_transformer():
    """The tiny pipeline's transformer (builtin:tiny-sd3), fp32."""
    from diffusers import SD3Transformer2DModel

    from fdfo.models import tiny_sd3 as tiny

    return SD3Transformer2DModel.from_pretrained(str(tiny.tiny_sd3_path() / "transformer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd35m", action="store_true", help="SD3.5-M's transformer at random init (else tiny)")
    parser.add_argument("--resolution", type=int, default=128, help="pixels (latent side = resolution / 8)")
    parser.add_argument("--rows", type=int, default=2)
    args = parser.parse_args()
    from diffusers import SD3Transformer2DModel

    from fdfo.models import tiny_sd3 as tiny

    if args.sd35m:
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**tiny.SD35M_TRANSFORMER_CONFIG)
    else:
        transformer = tiny_transformer()
    transformer = gpu_like_(transformer.requires_grad_(False).eval())
    inputs = random_inputs(transformer, args.rows, args.resolution // 8)
    print({k: f"{v:.3g}" for k, v in relative_changes(transformer, inputs).items()})


if __name__ == "__main__":
    main()
