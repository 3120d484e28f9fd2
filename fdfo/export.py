"""Export a checkpoint's LoRA in the diffusers format, for plain diffusers pipelines.

    python -m fdfo.export CHECKPOINT OUT_DIR
    # then, in Python:
    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16)
    pipe.load_lora_weights(OUT_DIR)
    # a FLUX checkpoint (its state.json records the model family):
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
    pipe.load_lora_weights(OUT_DIR)

CHECKPOINT takes every form generate.py takes (a Hugging Face folder address, hf:ORG/REPO/SUB, a local PEFT folder or
diffusers LoRA folder, a run or run checkpoint). An adapter holding NaN or infinite values is refused. Why an export:
`load_lora_weights` on a PEFT folder silently loads nothing, and a state dict without its LoRA config is loaded with
alpha = rank, i.e. with the wrong scale whenever alpha != rank. The export renames the tensors to diffusers'
`transformer.<module>.lora_A.weight` keys and stores rank, alpha and targets as the adapter metadata that
`load_lora_weights` reads, through diffusers' own `save_lora_weights` of the checkpoint's model family (FluxPipeline's
for a FLUX checkpoint, StableDiffusion3Pipeline's otherwise). The file gets the permissions the umask gives
new files (safetensors itself creates it readable by its owner only).

OUT_DIR is checked before the adapter is read (it must be a folder, or creatable, and writable). The file is written
under a temporary name and renamed into place, so an earlier export in OUT_DIR is replaced whole (the message says
so) and a failed export (a full disk, Ctrl-C) leaves it as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from fdfo.cli import guarded
from fdfo.outputs import check_output_path, disk_full, replace_file

PEFT_PREFIX = "base_model.model."
EXPORT_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora_weights gives it and load_lora_weights reads
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
    from fdfo.adapters import read_adapter
    from fdfo.hub import resolve_checkpoint
    from fdfo.models.registry import SD3, policy_class, recorded_family

    out_dir = check_output_path("OUT_DIR", out_dir, folder=True)  # before anything is resolved, downloaded or read
    if (out_dir / EXPORT_FILE).is_dir():
        raise ValueError(f"OUT_DIR {str(out_dir)!r} holds a folder named {EXPORT_FILE}; remove it or choose another "
                         "OUT_DIR")
    ckpt = resolve_checkpoint(checkpoint)
    if ckpt.adapter_dir is None:
        raise ValueError("nothing to export: the checkpoint is the base model; pass a checkpoint folder or address")
    adapter = read_adapter(ckpt)  # PEFT or diffusers form; tensors keyed by transformer module
    tensors = {k: v.contiguous() for k, v in adapter.state.items()}
    metadata = lora_metadata(adapter.config)
    path = out_dir / EXPORT_FILE
    pipeline = policy_class(recorded_family(ckpt.model_family, ckpt.pretrained_model) or SD3).pipeline_class()
    replaced = save(tensors, metadata, path, pipeline)
    print(f"{'replaced' if replaced else 'wrote'} {path}{' (the earlier export there)' if replaced else ''}: "
          f"{len(tensors)} tensors, rank {metadata['r']}, alpha {metadata['lora_alpha']:g}, from {ckpt.description}; "
          f"load it with {pipeline.__name__}.load_lora_weights")
    if ckpt.guidance_scale is not None:
        print(f"it was trained with guidance scale {ckpt.guidance_scale:g} (from its {ckpt.guidance_source}): sample "
              f"with pipe(..., guidance_scale={ckpt.guidance_scale:g})")
    return path


def save(tensors: dict, metadata: dict, path: Path, pipeline=None) -> bool:
    """`pipeline.save_lora_weights` (default StableDiffusion3Pipeline's) into a temporary folder beside `path`, then
    one rename onto `path`; True if an earlier file was replaced. On any failure nothing is left behind (not even a
    folder this call created)."""
    from fdfo.files import fsync_path, is_disk_full

    if pipeline is None:
        from diffusers import StableDiffusion3Pipeline as pipeline

    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".export-tmp-{os.getpid()}"
    try:
        pipeline.save_lora_weights(tmp, transformer_lora_layers=tensors, transformer_lora_adapter_metadata=metadata)
        written = tmp / EXPORT_FILE
        written.chmod(0o666 & ~_umask())
        fsync_path(written)
        return replace_file(written, path)
    except BaseException as e:
        if created:
            shutil.rmtree(path.parent, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full(path) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ExportConfig:
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
    """Checkpoint to export: Hugging Face folder address, hf:ORG/REPO[/SUB], local PEFT folder, run or checkpoint."""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """Folder to write pytorch_lora_weights.safetensors to (created if needed; an earlier export there is replaced)."""


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(ExportConfig, args=argv, prog="python -m fdfo.export", description=__doc__)
    guarded(lambda: export(cfg.checkpoint, cfg.out_dir))


if __name__ == "__main__":
    main()
