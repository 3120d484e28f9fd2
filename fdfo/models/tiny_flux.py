"""A tiny FLUX.1-dev pipeline of the real architecture, built offline for tests and smoke runs (`builtin:tiny-flux`).

Every component is the real diffusers / transformers class, only shrunk: `FluxTransformer2DModel` with the guidance
embedding (2 double-stream + 2 single-stream blocks of 2 x 16-dim heads, 3-axis rotary positions), a 16-channel
`AutoencoderKL` with scale factor 8 and FLUX's latent scale and shift, a `CLIPTextModel` (pooled output) and a
`T5EncoderModel`, and the flow-matching Euler scheduler with FLUX.1-dev's resolution-dependent shift. Tokenizers
and text encoders are fdfo/models/tiny_text.py's, the VAE the tiny SD3's (fdfo/models/tiny_sd3.py). The folder loads
with `FluxPipeline.from_pretrained` exactly as `black-forest-labs/FLUX.1-dev` does; 64 px images are 8 x 8 latents,
16 packed tokens, as for SD3's smoke settings.
"""

from __future__ import annotations

import pathlib

import torch

from fdfo.models import tiny_sd3, tiny_text
from fdfo.models.builtin import build_once, cache_folder
from fdfo.models.shapes import FLUX_DEV_VAE_CONFIG

TINY_FLUX = "builtin:tiny-flux"
_CACHE_NAME = "tiny-flux-v1"  # bump the suffix whenever the built weights or configs change

_CLIP_WIDTH = tiny_text.CLIP_WIDTHS[0]  # FLUX's only CLIP is CLIP-L/14 (its pooled output, 768 wide in the real model)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2 x 2 packed patch
    num_layers=2,  # double-stream blocks (19 in FLUX.1-dev)
    num_single_layers=2,  # single-stream blocks (38)
    attention_head_dim=tiny_sd3.HEAD_DIM,
    num_attention_heads=tiny_sd3.HEADS,
    joint_attention_dim=tiny_text.T5_WIDTH,
    pooled_projection_dim=_CLIP_WIDTH,
    guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
    axes_dims_rope=(4, 6, 6),  # (text index, row, column) rotary widths, summing to the head dim as (16, 56, 56) does
)
# black-forest-labs/FLUX.1-dev: scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                        base_image_seq_len=256, max_image_seq_len=4096)
VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR = FLUX_DEV_VAE_CONFIG["scaling_factor"], FLUX_DEV_VAE_CONFIG["shift_factor"]


def _transformer():
    """The FLUX transformer with its conditioning paths amplified as the tiny SD3's are (fdfo/models/tiny_sd3.py:
    amplify_conditioning), including the two FLUX-only ones: the single-stream blocks' AdaLN (`norm.linear`) and the
    guidance embedder (so that the guidance value visibly changes the velocity)."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    tiny_sd3.amplify_conditioning(transformer)
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.startswith("single_transformer_blocks.") and name.endswith(".norm.linear"):
                module.weight.mul_(tiny_sd3.ADALN_GAIN)
            elif name.endswith("guidance_embedder.linear_1"):
                module.weight.mul_(tiny_sd3.TIME_GAIN)
    return transformer.eval()


def _vae():
    """The tiny SD3's VAE with FLUX's latent scale and shift."""
    vae = tiny_sd3._vae()
    vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR)
    return vae


def _clip_text_model(tokenizer):
    """A CLIPTextModel (no projection: FLUX reads its pooled output) of the tiny SD3's first CLIP configuration."""
    from transformers import CLIPTextModel

    return CLIPTextModel(tiny_text.clip_text_encoder(tokenizer, _CLIP_WIDTH, "quick_gelu").config).eval()


def _pipeline():
    """All FLUX components at random init, wired into a FluxPipeline (global RNG already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer, tokenizer_2 = tiny_text.tiny_clip_tokenizer(), tiny_text.tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=_vae(),
        text_encoder=_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=tiny_text.t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=_transformer(),
    )


def build_tiny_flux(out_dir, seed: int = 0) -> pathlib.Path:
    """Build the tiny FLUX pipeline into `out_dir` unless it is already there (atomic, see fdfo.models.builtin)."""
    return build_once(out_dir, _pipeline, seed)


def tiny_flux_path() -> pathlib.Path:
    """The shared cached build: $FDFO_TINY_CACHE/tiny-flux-v<N> (default under ~/.cache/fdfo); built if missing."""
    return build_tiny_flux(cache_folder(_CACHE_NAME))
