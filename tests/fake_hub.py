"""A fake Hugging Face cache with the published checkpoints' layout, for generate/metrics/export tests.

`build_checkpoint_cache(dir)` lays out, under the real repository ids, the tiny SD3 pipeline as
`stabilityai/stable-diffusion-3.5-medium` and tiny random (non-zero) PEFT LoRAs where the published ones live; see its
docstring for the exact contents. Point a subprocess at it with `hub_env(info, tmp_path)` (HF_HUB_OFFLINE=1,
HF_HUB_CACHE, HF_HOME): huggingface_hub reads them at import, so in-process tests must not rely on them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import LORA_TARGETS, SD35_MEDIUM
from tests.tiny_rewards import build_fake_hf_cache

FDFO_REPO = "nvidia/finite-difference-flow-optimization"
NFT_REPO = "worstcoder/SD3.5M-DiffusionNFT-MultiReward"
BAD_REPO = "test-org/bad-adapters"
NO_CFG = "fdfo-combined-reward-no-cfg/epoch-0000100"
CFG_45 = "fdfo-combined-reward-cfg-4.5/epoch-0000100"
DECOY = "fdfo-pickscore-reward-no-cfg/epoch-0000100"  # damaged on purpose: reading it fails loudly


def tiny_transformer():
    """The tiny pipeline's transformer alone (fp32, CPU), e.g. to build adapters for it."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(tiny.tiny_sd3_path(), subfolder="transformer").eval()


def make_adapter(folder: str | Path, transformer: torch.nn.Module, rank: int, alpha: float, seed: int,
                 targets: tuple[str, ...] = LORA_TARGETS, std: float = 0.15) -> dict[str, torch.Tensor]:
    """Save a PEFT LoRA for `transformer` with seeded random A and B (B != 0, so it changes the model) to `folder`;
    the transformer is left unwrapped. Returns the saved state dict (keys `base_model.model.<module>.lora_X.weight`)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(transformer, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (std if "lora_B" in name else 1 / p.shape[-1] ** 0.5))
    model.save_pretrained(str(folder))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    model.unload()
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    return state


def _wrong_shape(folder: Path, transformer: torch.nn.Module) -> None:
    """A LoRA whose A matrices expect 8 more input features than the tiny model's layers have."""
    state = make_adapter(folder, transformer, rank=4, alpha=4, seed=9)
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))


def build_checkpoint_cache(cache_dir: str | Path) -> dict:
    """Build the fake hub cache in `cache_dir` (~3 s) and return what it holds:

    * `SD35_MEDIUM` (`stabilityai/stable-diffusion-3.5-medium`): the tiny SD3 pipeline (64 px native, any multiple
      of 16 px up to 512).
    * `FDFO_REPO` (`nvidia/finite-difference-flow-optimization`): `NO_CFG` = `fdfo-combined-reward-no-cfg/epoch-0000100`
      (rank 4, alpha 8, seed 1) and `CFG_45` = `fdfo-combined-reward-cfg-4.5/epoch-0000100` (rank 4, alpha 8, seed 2),
      both on the eight joint-attention projections; `DECOY` = `fdfo-pickscore-reward-no-cfg/epoch-0000100` holds
      garbage in both adapter files (any code that reads it fails); a README.md at the root.
    * `NFT_REPO` (`worstcoder/SD3.5M-DiffusionNFT-MultiReward`): an adapter at the repository root (rank 2, alpha 6,
      seed 3, only `attn.to_q attn.to_k attn.to_v attn.to_out.0`).
    * `BAD_REPO` (`test-org/bad-adapters`): `wrong-shape/` (A matrices 8 columns too wide) and `wrong-target/`
      (adapter_config.json targets a module name the model does not have).

    The returned dict: `cache` (Path), `models` {name: repo id}, and `adapters` {key: {"repo", "subfolder", "url",
    "hf", "rank", "alpha", "guidance_scale"}} for keys `no_cfg`, `cfg_4.5`, `nft`, `decoy`, `wrong_shape`,
    `wrong_target` (`guidance_scale` is what the folder name implies, None when it says nothing).
    """
    cache_dir = Path(cache_dir)
    transformer = tiny_transformer()

    def sd3(folder: Path) -> None:
        shutil.copytree(tiny.tiny_sd3_path(), folder)

    def fdfo(folder: Path) -> None:
        make_adapter(folder / NO_CFG, transformer, rank=4, alpha=8, seed=1)
        make_adapter(folder / CFG_45, transformer, rank=4, alpha=8, seed=2)
        (folder / DECOY).mkdir(parents=True)
        (folder / DECOY / "adapter_config.json").write_text("{ not json")
        (folder / DECOY / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 8)
        (folder / "README.md").write_text("tiny stand-ins for the published FDFO checkpoints\n")

    def nft(folder: Path) -> None:
        make_adapter(folder, transformer, rank=2, alpha=6, seed=3, targets=LORA_TARGETS[:4], std=0.3)

    def bad(folder: Path) -> None:
        folder.mkdir(parents=True)
        _wrong_shape(folder / "wrong-shape", transformer)
        make_adapter(folder / "wrong-target", transformer, rank=2, alpha=2, seed=4)
        config = json.loads((folder / "wrong-target/adapter_config.json").read_text())
        config["target_modules"] = ["attn.to_qkv_fused"]
        (folder / "wrong-target/adapter_config.json").write_text(json.dumps(config))

    build_fake_hf_cache(cache_dir, {SD35_MEDIUM: sd3, FDFO_REPO: fdfo, NFT_REPO: nft, BAD_REPO: bad})

    def entry(repo: str, subfolder: str, rank: int, alpha: float, guidance: float | None) -> dict:
        tree = f"/tree/main/{subfolder}" if subfolder else ""
        return dict(repo=repo, subfolder=subfolder, url=f"https://huggingface.co/{repo}{tree}",
                    hf=f"hf:{repo}" + (f"/{subfolder}" if subfolder else ""), rank=rank, alpha=alpha,
                    guidance_scale=guidance)

    return dict(
        cache=cache_dir,
        models={"sd3": SD35_MEDIUM},
        adapters={
            "no_cfg": entry(FDFO_REPO, NO_CFG, 4, 8, 1.0),
            "cfg_4.5": entry(FDFO_REPO, CFG_45, 4, 8, 4.5),
            "nft": entry(NFT_REPO, "", 2, 6, None),
            "decoy": entry(FDFO_REPO, DECOY, 0, 0, 1.0),
            "wrong_shape": entry(BAD_REPO, "wrong-shape", 4, 4, None),
            "wrong_target": entry(BAD_REPO, "wrong-target", 2, 2, None),
        },
    )


def hub_env(info: dict, tmp_path: str | Path) -> dict[str, str]:
    """Environment for a subprocess that must resolve everything from the fake cache, offline, on one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(info["cache"]),
            "HF_HOME": str(Path(tmp_path) / "hf-home"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
