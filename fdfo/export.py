"""Export a checkpoint's LoRA in the diffusers format, for plain diffusers pipelines.

    python -m fdfo.export CHECKPOINT OUT_DIR
    # then, in Python:
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16)
    pipe.load_lora_weights(OUT_DIR)

CHECKPOINT takes every form generate.py takes (a Hugging Face folder address, hf:ORG/REPO/SUB, a local PEFT folder or
diffusers LoRA folder, a run or run checkpoint). An adapter holding NaN or infinite values is refused. Why an export:
`load_lora_weights` on a PEFT folder silently loads nothing, and a state dict without its LoRA config is loaded with
alpha = rank, i.e. with the wrong scale whenever alpha != rank. The export renames the tensors to diffusers'
`transformer.<module>.lora_A.weight` keys and stores rank, alpha and targets as the adapter metadata that
`load_lora_weights` reads, through diffusers' own `save_lora_weights`. The file gets the permissions the umask gives
new files (safetensors itself creates it readable by its owner only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from fdfo.cli import guarded

PEFT_PREFIX = "base_model.model."
# LoraConfig fields that decide what the adapter computes; the rest of adapter_config.json is bookkeeping.
METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                   "lora_bias", "fan_in_fan_out", "exclude_modules", "layers_to_transform", "layers_pattern")


def diffusers_lora(state: dict, config) -> tuple[dict, dict]:
    """PEFT adapter tensors + LoraConfig -> (tensors keyed by transformer module, adapter metadata) for
    `StableDiffusion3Pipeline.save_lora_weights`, which adds the `transformer.` prefix to both."""
    strange = [k for k in state if not k.startswith(PEFT_PREFIX)]
    if strange:
        raise ValueError(f"unexpected tensor names in the adapter (e.g. {strange[0]!r}); expected PEFT's "
                         f"'{PEFT_PREFIX}<module>.lora_A.weight'")
    return {k[len(PEFT_PREFIX):]: v.contiguous() for k, v in state.items()}, lora_metadata(config)


def lora_metadata(config) -> dict:
    """The LoraConfig fields that decide what the adapter computes, as diffusers' adapter metadata."""
    metadata = {}
    for key in METADATA_FIELDS:
        value = getattr(config, key, None)
        if value is None:
            continue
        metadata[key] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return metadata


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export(checkpoint: str, out_dir: str | Path) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (diffusers format) for `checkpoint`; returns the file."""
    from diffusers import StableDiffusion3Pipeline

    from fdfo.generation import read_adapter
    from fdfo.hub import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    if ckpt.adapter_dir is None:
        raise ValueError("nothing to export: the checkpoint is the base model; pass a checkpoint folder or address")
    adapter = read_adapter(ckpt)  # PEFT or diffusers form; tensors keyed by transformer module
    tensors = {k: v.contiguous() for k, v in adapter.state.items()}
    metadata = lora_metadata(adapter.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(out_dir, transformer_lora_layers=tensors,
                                               transformer_lora_adapter_metadata=metadata)
    path = out_dir / "pytorch_lora_weights.safetensors"
    path.chmod(0o666 & ~_umask())
    print(f"wrote {path}: {len(tensors)} tensors, rank {metadata['r']}, alpha {metadata['lora_alpha']:g}, from "
          f"{ckpt.description}")
    if ckpt.guidance_scale is not None:
        print(f"it was trained with guidance scale {ckpt.guidance_scale:g} (from its {ckpt.guidance_source}): sample "
              f"with pipe(..., guidance_scale={ckpt.guidance_scale:g})")
    return path


@dataclass
class ExportConfig:
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
    """Checkpoint to export: Hugging Face folder address, hf:ORG/REPO[/SUB], local PEFT folder, run or checkpoint."""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """Folder to write pytorch_lora_weights.safetensors to (created if needed)."""


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(ExportConfig, args=argv, description=__doc__)
    guarded(lambda: export(cfg.checkpoint, cfg.out_dir))


if __name__ == "__main__":
    main()
