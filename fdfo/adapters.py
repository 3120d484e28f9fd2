"""A checkpoint's LoRA read from disk, in either format: PEFT (adapter_config.json + adapter_model.safetensors, what
train.py saves) or diffusers (pytorch_lora_weights.safetensors with `transformer.`-prefixed keys; rank and alpha from
the file's adapter metadata, else inferred from the shapes with alpha = rank, as diffusers does). Damaged or non-finite
adapters are one ValueError naming the file. fdfo/generation.py injects them into a base model, fdfo/export.py writes
them in the diffusers format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fdfo.hub import DIFFUSERS_FILE, Checkpoint

PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig fields


@dataclass
class Adapter:
    """A LoRA read from disk: its peft.LoraConfig and its tensors (CPU) keyed by transformer module,
    `<module>.lora_A.weight` / `<module>.lora_B.weight`, whichever format the file was in."""

    checkpoint: Checkpoint
    config: object  # peft.LoraConfig
    state: dict[str, torch.Tensor]
    file: str  # the tensor file, for messages


def _lora_config(checkpoint: Checkpoint, fields: dict):
    from peft import LoraConfig

    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint.description}: the adapter's LoRA settings are invalid "
                         f"({' '.join(str(e).split())[:300]})") from None


def _read_peft(checkpoint: Checkpoint) -> tuple[object, dict[str, torch.Tensor], str]:
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = checkpoint.adapter_dir
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint.description}: adapter_config.json is damaged ({e})") from None
    kind = raw.get("peft_type", "LORA") if isinstance(raw, dict) else type(raw).__name__
    if kind != "LORA":
        raise ValueError(f"checkpoint {checkpoint.description}: only LoRA adapters are supported, its "
                         f"adapter_config.json holds {kind}")
    file = folder / "adapter_model.safetensors"
    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(file), device="cpu")
    except Exception as e:  # peft / safetensors raise assorted types for a damaged file
        raise ValueError(f"checkpoint {checkpoint.description}: cannot read the adapter "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    strange = [k for k in state if not k.startswith(PEFT_PREFIX)]
    if strange:
        raise ValueError(f"checkpoint {checkpoint.description}: unexpected tensor name {strange[0]!r} in {file}; "
                         f"a PEFT adapter's tensors are named '{PEFT_PREFIX}<module>.lora_A.weight'")
    return config, {k[len(PEFT_PREFIX):]: v for k, v in state.items()}, str(file)


def _read_diffusers(checkpoint: Checkpoint) -> tuple[object, dict[str, torch.Tensor], str]:
    """pytorch_lora_weights.safetensors as diffusers' save_lora_weights writes it: LoraConfig from the file's
    metadata, or from the tensor shapes with alpha = rank when it has none (what diffusers' loader assumes)."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from safetensors import safe_open

    file = checkpoint.adapter_dir / DIFFUSERS_FILE
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        raw = header.get(METADATA_KEY)
        metadata = json.loads(raw) if raw else {}
    except Exception as e:  # safetensors / json raise assorted types for a damaged file
        raise ValueError(f"checkpoint {checkpoint.description}: cannot read {file} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    strange = [k for k in state if not (k.startswith(DIFFUSERS_PREFIX) and (".lora_A." in k or ".lora_B." in k))]
    if strange or not state:
        raise ValueError(f"checkpoint {checkpoint.description}: {file} is not a diffusers LoRA for a "
                         f"transformer: expected tensors named '{DIFFUSERS_PREFIX}<module>.lora_A.weight' / "
                         f"'.lora_B.weight', found {strange[0] if strange else 'none'!r}")
    state = {k[len(DIFFUSERS_PREFIX):]: v for k, v in state.items()}
    fields = {k[len(DIFFUSERS_PREFIX):]: v for k, v in metadata.items() if k.startswith(DIFFUSERS_PREFIX)}
    if not fields:
        ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
        fields = get_peft_kwargs(ranks, network_alpha_dict=None, peft_state_dict=state, is_unet=False)
    return _lora_config(checkpoint, fields), state, str(file)


def read_adapter(checkpoint: Checkpoint) -> Adapter:
    """The checkpoint's LoRA (PEFT folder, or diffusers file when the folder holds no PEFT adapter), checked for
    non-finite values. Unreadable or damaged adapters: ValueError naming the file."""
    folder = checkpoint.adapter_dir
    if (folder / "adapter_config.json").is_file() or not (folder / DIFFUSERS_FILE).is_file():
        config, state, file = _read_peft(checkpoint)
    else:
        config, state, file = _read_diffusers(checkpoint)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"checkpoint {checkpoint.description}: the adapter file {file} holds NaN or infinite "
                         f"values in {len(bad)} of its {len(state)} tensors (e.g. {bad[0]}); it is damaged or "
                         f"comes from a diverged run")
    config.inference_mode = True
    return Adapter(checkpoint, config, state, file)
