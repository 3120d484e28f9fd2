"""The bench's models: the transformer and VAE of the real shapes at random init, fake text embeddings and a stub
reward (nothing is downloaded)."""

from __future__ import annotations

import torch

from fdfo.models.sd3 import TEXT_TOKENS

__all__ = ["TEXT_TOKENS", "StubReward", "build_models", "fake_encoder", "model_configs"]


def model_configs(tiny: bool, model: str = "sd35m") -> tuple[dict, dict]:
    """(transformer kwargs, VAE kwargs): `model`'s real shapes (fdfo/models/shapes.py MODELS; default SD3.5-Medium),
    or the tiny offline pipeline's (fdfo/models/tiny_sd3.py)."""
    from fdfo.models import shapes, tiny_sd3

    if not tiny:
        return shapes.MODELS[model][2], shapes.MODELS[model][3]
    return tiny_sd3.TRANSFORMER_CONFIG, tiny_sd3.VAE_CONFIG


def build_models(tiny: bool, device: torch.device, model: str = "sd35m"):
    """Random-init SD3 transformer (`model`: sd35m or sd35l) and VAE, created directly on `device` (no CPU copy of the
    full model)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-init models: no warnings about casting pretrained weights
    tcfg, vcfg = model_configs(tiny, model)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**tcfg)
        vae = AutoencoderKL(**vcfg)
    return transformer, vae, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def fake_encoder(tcfg: dict, device: torch.device, dtype: torch.dtype):
    """Prompt -> fixed random embeddings of the real shapes (the text encoders are not part of the benchmark)."""
    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        g = torch.Generator(device).manual_seed(len(prompts))
        n = len(prompts)
        return {"embeds": torch.randn(n, TEXT_TOKENS, tcfg["joint_attention_dim"], generator=g, device=device,
                                      dtype=dtype),
                "pooled": torch.randn(n, tcfg["pooled_projection_dim"], generator=g, device=device, dtype=dtype)}
    return encode


class StubReward:
    """Mean image brightness plus a small per-sample offset: finite, cheap, distinct within each pair."""

    def components(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        score = torch.nan_to_num(images.float().mean(dim=(1, 2, 3)), nan=0.0)
        return {"reward": score + 1e-3 * torch.arange(len(images), device=images.device)}

    def offload(self) -> None:
        pass
