"""A tiny Stable Diffusion 3 pipeline of the real architecture, built offline for tests and smoke runs, and
SD3.5-Medium's shapes at random init (`builtin:random-sd35m`).

Every component is the real diffusers / transformers class (SD3 MMDiT, 16-channel VAE, two CLIP text encoders with
projection, T5 encoder, flow-matching Euler scheduler), only shrunk; the tokenizers and text encoders are
fdfo/models/tiny_text.py's. The folder written by `build_tiny_sd3` loads with
`StableDiffusion3Pipeline.from_pretrained(folder)` exactly as `stabilityai/stable-diffusion-3.5-medium` does, so code
under test takes the same path as a real run. Pass `--pretrained-model builtin:tiny-sd3` (see `resolve_builtin`).
"""

from __future__ import annotations

import os
import pathlib

import torch

from fdfo.models.builtin import build_once, cache_folder
from fdfo.models.shapes import SD35_CLIP_PROJECTIONS, SD35_VAE_CONFIG, SD35M_TRANSFORMER_CONFIG
from fdfo.models.tiny_text import (
    CLIP_WIDTHS,
    T5_WIDTH,
    clip_text_encoder,
    t5_encoder,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

TINY_SD3 = "builtin:tiny-sd3"
TINY_SD35L = "builtin:tiny-sd35l"  # the tiny SD3 in SD3.5-Large's block layout: no dual attention
RANDOM_SD35M = "builtin:random-sd35m"
_CACHE_NAME = "tiny-sd3-v2"  # bump the suffix whenever the built weights or configs change
_CACHE_NAME_SD35L = "tiny-sd35l-v1"

HEADS, HEAD_DIM = 2, 16  # the tiny transformers' attention (tiny FLUX's too)
ADALN_GAIN, TEXT_GAIN, TIME_GAIN = 2.0, 2.0, 4.0  # see amplify_conditioning
_DECODER_GAIN = 1.5  # random decoder output std 0.4 -> 0.6 in [-1, 1]: latents give visibly different images
# Residual branches of the decoder (resnet conv2, attention output) are damped so that the decoder is close to a fixed
# linear map followed by one normalisation: the gradient of an image colour statistic w.r.t. the latent then points the
# same way for every latent (cosine ~0.8 between random latents, against ~0.1 at default init), and analytic colour
# rewards are learnable within a few smoke epochs, as they are for a real VAE.
_DECODER_RESIDUAL_GAIN = 0.05


def amplify_conditioning(transformer) -> None:
    """Scale up the random weights that carry the timestep and the prompt.

    At PyTorch's default init the AdaLN modulations and the text embedders are so small that the velocity barely
    depends on t or the prompt (output differences ~0.03-0.05 against an output std of 0.55), so a prompt-dependent
    reward would see nearly the same image for every prompt. With these gains the tiny model's velocity depends on
    x, t and the prompt about equally (differences ~0.66, 0.39 and 0.64; output std 0.68).
    """
    gains = {
        ("norm1.linear", "norm1_context.linear", "norm_out.linear"): ADALN_GAIN,
        ("context_embedder", "text_embedder.linear_1", "text_embedder.linear_2"): TEXT_GAIN,
        ("timestep_embedder.linear_1",): TIME_GAIN,
    }
    with torch.no_grad():
        for name, module in transformer.named_modules():
            for suffixes, gain in gains.items():
                if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
                    module.weight.mul_(gain)


# The tiny transformer and VAE configs (also used by fdfo.bench --tiny).
TRANSFORMER_CONFIG = dict(
    sample_size=8,  # latent side, so the pipeline's default resolution is 8 * 8 = 64 px
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=HEADS,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=HEADS * HEAD_DIM,
    pooled_projection_dim=sum(CLIP_WIDTHS),
    pos_embed_max_size=32,  # up to 32 x 32 patches, i.e. 512 px
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
# SD3.5-Large's layout (fdfo/models/shapes.py): every block a plain joint attention, no second (image-only) attention.
SD35L_LAYOUT_CONFIG = dict(TRANSFORMER_CONFIG, dual_attention_layers=())
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _transformer(config: dict):
    """MMDiT-X like SD3.5 Medium (QK RMS-norm, dual attention in the first block), 2 blocks of 2 x 16-dim heads; or
    with SD35L_LAYOUT_CONFIG SD3.5-Large's plain MMDiT blocks (QK RMS-norm, no dual attention)."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**config)
    amplify_conditioning(transformer)
    return transformer


def _vae():
    """16-channel KL autoencoder with 4 resolution levels (scale factor 8) and SD3's latent scale and shift."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(_DECODER_GAIN)
        for name, module in vae.decoder.named_modules():
            if name.endswith(("conv2", "to_out.0")):
                module.weight.mul_(_DECODER_RESIDUAL_GAIN)
                module.bias.mul_(_DECODER_RESIDUAL_GAIN)
    return vae.eval()


def _pipeline(transformer_config: dict = TRANSFORMER_CONFIG):
    """All SD3 components at random init, wired into a StableDiffusion3Pipeline (global RNG already seeded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_transformer(transformer_config),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(),
        text_encoder=clip_text_encoder(tokenizer, CLIP_WIDTHS[0], "quick_gelu"),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer_2, CLIP_WIDTHS[1], "gelu"),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3),
        tokenizer_3=tokenizer_3,
    )


# ---------------------------------------------------------------------------------------------------------------------
# SD3.5-Medium's own transformer and VAE at random init (benchmarks and GPU checks: real shapes, no download).


def random_sd35m_pipeline(device: torch.device, seed: int = 0):
    """`builtin:random-sd35m`: SD3.5-Medium's transformer and VAE configs at random init, created directly on
    `device`, with small random text encoders of the real output widths (CLIP projections 768 + 1280, T5 width 4096)
    and the tiny tokenizers. fp32; the caller casts. Same weights for the same seed; the caller's RNG is untouched."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    device = torch.device(device)
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(seed)
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=AutoencoderKL(**SD35_VAE_CONFIG),
            text_encoder=clip_text_encoder(tokenizer, CLIP_WIDTHS[0], "quick_gelu", SD35_CLIP_PROJECTIONS[0]),
            tokenizer=tokenizer,
            text_encoder_2=clip_text_encoder(tokenizer_2, CLIP_WIDTHS[1], "gelu", SD35_CLIP_PROJECTIONS[1]),
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5_encoder(tokenizer_3, d_model=SD35M_TRANSFORMER_CONFIG["joint_attention_dim"]),
            tokenizer_3=tokenizer_3,
        )


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny pipeline into `out_dir` (2.5 MB, ~1 s) unless it is already there; return the folder (atomic,
    the caller's RNG untouched, equal seeds give identical weights: fdfo.models.builtin.build_once)."""
    return build_once(out_dir, _pipeline, seed)


def build_tiny_sd35l(out_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """The tiny pipeline with SD3.5-Large's block layout (SD35L_LAYOUT_CONFIG), built as `build_tiny_sd3` builds."""
    return build_once(out_dir, lambda: _pipeline(SD35L_LAYOUT_CONFIG), seed)


def tiny_sd3_path() -> pathlib.Path:
    """The shared cached build: $FDFO_TINY_CACHE/<name>, default ~/.cache/fdfo/<name> (name: _CACHE_NAME); built if
    missing."""
    return build_tiny_sd3(cache_folder(_CACHE_NAME))


def resolve_builtin(name: str) -> str:
    """Map `builtin:tiny-sd3` / `builtin:tiny-sd35l` to the local folder of the tiny pipeline (built on first use);
    pass any other model name through."""
    if name == TINY_SD35L:
        return str(build_tiny_sd35l(cache_folder(_CACHE_NAME_SD35L)))
    return str(tiny_sd3_path()) if name == TINY_SD3 else name
