"""The bench's FLOP model: FlopCounterMode on the meta device (no weights, no GPU), per image, per training item and
per pair, and the GPUs' peak rates that MFU is measured against."""

from __future__ import annotations

import argparse

import torch

from fdfo.bench.models import model_configs
from fdfo.models.shapes import MODELS

# Dense bf16 / fp16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's spec sheets (SXM parts, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
PEAK_SOURCE = "NVIDIA spec sheet, dense bf16/fp16 tensor-core peak (no sparsity); MFU = achieved / peak"


def count_flops(tiny: bool, resolution: int, lora_rank: int = 32, model: str = "sd35m") -> dict[str, float]:
    """FLOPs of one transformer forward per image, of one training item (forward + backward with the frozen base and
    the LoRA), and of one VAE decode per image, at the given resolution; counted without weights (meta device).
    model: whose real shapes (fdfo/models/shapes.py MODELS: sd35m, sd35l, flux-dev); --tiny: the tiny SD3's."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from fdfo.models.registry import family_module

    family, tcfg, vcfg = ("sd3", *model_configs(True)) if tiny else (MODELS[model][0], *MODELS[model][2:])
    side = resolution // 8
    module = family_module(family)
    network, _ = module.meta_lora_model(tcfg, lora_rank, torch.float32)  # alpha 2 r: alpha does not change FLOPs
    inputs = module.meta_inputs(tcfg, 1, side, torch.float32)
    with torch.device("meta"):
        vae = AutoencoderKL(**vcfg).requires_grad_(False)
        x = torch.randn(1, vcfg["latent_channels"], side, side)
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                network(**inputs, return_dict=False)
        with FlopCounterMode(display=False) as train:
            network(**inputs, return_dict=False)[0].float().square().mean().backward()
        with FlopCounterMode(display=False) as decode:
            with torch.no_grad():
                vae.decode(x, return_dict=False)
    return {"fwd_per_image": float(forward.get_total_flops()), "train_item": float(train.get_total_flops()),
            "decode_per_image": float(decode.get_total_flops())}


def bench_prompts(count: int) -> list[str]:
    """The bench's prompts (what they say does not matter; their token count enters the reward's text FLOPs)."""
    return [f"prompt {i}" for i in range(count)]


def reward_flops(args: argparse.Namespace, prompts: list[str]) -> dict[str, float]:
    """--reward pickscore: the CLIP's FLOPs per image and per prompt (fdfo/bench/reward.py); the stub: none."""
    from fdfo.bench import reward as bench_reward

    return bench_reward.count_flops(args.tiny, prompts) if args.reward == "pickscore" else {}


def with_lora(transformer: torch.nn.Module, lora_rank: int) -> torch.nn.Module:
    """The SD3 LoRA as count_flops adds it (alpha = 2 r, the paper's ratio; alpha does not change FLOPs)."""
    from fdfo.models.sd3 import add_lora

    return add_lora(transformer, lora_rank, 2.0 * lora_rank)


def flops_per_pair(flops: dict[str, float], steps: int, cfg: bool, kl_weight: float = 0.0,
                   trained_steps: int | None = None) -> dict:
    """Per pair: sampling 2 T forwards (x2 with classifier-free guidance, `cfg`: the model's `uses_cfg` of the
    guidance scale), decode 2 images, training 2 K items (K = T unless --timesteps-per-sample; + a forward with KL),
    scoring 2 (image, prompt) with --reward pickscore (else None)."""
    trained_steps = steps if trained_steps is None else trained_steps
    cfg_factor = 2 if cfg else 1
    train_item = flops["train_item"] * cfg_factor + (flops["fwd_per_image"] * cfg_factor if kl_weight > 0 else 0.0)
    reward = 2 * (flops["reward_image"] + flops["reward_text_per_prompt"]) if "reward_image" in flops else None
    return {"sample": 2 * steps * cfg_factor * flops["fwd_per_image"], "decode": 2 * flops["decode_per_image"],
            "reward": reward, "exchange": 0.0, "train": 2 * trained_steps * train_item}


def peak_tflops(gpu: str | None, precision: str) -> float | None:
    if gpu is None or precision == "fp32":
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def uses_cfg(args: argparse.Namespace) -> bool:
    """Whether --guidance-scale makes --model's velocity two forward passes (SD3: any scale but 1; FLUX: never)."""
    from fdfo.models.registry import policy_class

    return policy_class("sd3" if args.tiny else MODELS[args.model][0]).uses_cfg(args.guidance_scale)


def flops_record(args: argparse.Namespace) -> dict:
    flops = reward_flops(args, bench_prompts(args.pairs)) | count_flops(args.tiny, args.resolution, model=args.model)
    per_pair = flops_per_pair(flops, args.steps, uses_cfg(args))
    return dict(config=dict(vars(args)), flops=dict(flops, per_pair=per_pair,
                                                    total_per_pair=sum(v for v in per_pair.values() if v)))


def flop_text(flops: float) -> str:
    """FLOPs in the unit that shows them (TFLOP for the full shapes, GFLOP or MFLOP for --tiny's)."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.4g} {unit}"
    return f"{flops:.4g} FLOP"
