"""Which model family a base model belongs to, from its name alone (nothing loads), and the one place that turns a
name into a policy or a pipeline. The rest of the code asks these functions, never which model it has.

A name is a built-in model (`builtin:tiny-sd3`, `builtin:tiny-sd35l`, `builtin:random-sd35m`, `builtin:tiny-flux`),
a local folder (its model_index.json names the pipeline class), or a hub id (its model_index.json from the local
Hugging Face cache when it is there, else the id: one containing "flux" is FLUX, any other SD3).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

SD3, FLUX = "sd3", "flux"
LABELS = {SD3: "SD3", FLUX: "FLUX"}  # in messages
FAMILIES = {SD3: ("fdfo.models.sd3", "SD3Policy"), FLUX: ("fdfo.models.flux", "FluxPolicy")}
PIPELINES = {"StableDiffusion3Pipeline": SD3, "FluxPipeline": FLUX}  # model_index.json's _class_name -> family
BUILTINS = {"builtin:tiny-sd3": SD3, "builtin:tiny-sd35l": SD3, "builtin:random-sd35m": SD3,
            "builtin:tiny-flux": FLUX}
TINY = ("builtin:tiny-sd3", "builtin:tiny-sd35l", "builtin:tiny-flux")  # the offline test models (smoke runs)


def _pipeline_class_name(name: str) -> str | None:
    """model_index.json's `_class_name` of a local folder, or of a hub id in the local cache; None if not found."""
    path = Path(name).expanduser()
    index = path / "model_index.json" if path.is_dir() else None
    if index is None and name.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "model_index.json")
            index = Path(cached) if isinstance(cached, str) else None
        except Exception:  # an id the hub library refuses: fall back on the name
            index = None
    if index is None or not index.is_file():
        return None
    try:
        value = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def family_name(pretrained_model: str) -> str:
    """"sd3" or "flux" for a base model name (module docstring); ValueError naming the flag for a folder whose
    model_index.json names another pipeline."""
    if pretrained_model in BUILTINS:
        return BUILTINS[pretrained_model]
    if pretrained_model.startswith("builtin:"):
        raise ValueError(f"--pretrained-model {pretrained_model}: no such built-in model; the built-in ones are "
                         f"{', '.join(BUILTINS)}")
    class_name = _pipeline_class_name(pretrained_model)
    if class_name is not None:
        if class_name not in PIPELINES:
            raise ValueError(f"--pretrained-model {pretrained_model}: its model_index.json names a {class_name}; "
                             f"supported are {' and '.join(PIPELINES)} (docs/models.md)")
        return PIPELINES[class_name]
    return FLUX if "flux" in pretrained_model.lower() else SD3


def policy_class(family: str):
    """The policy class of a family ("sd3", "flux"): its constructor, load_pipeline, DEFAULT_GUIDANCE, PIPELINE..."""
    return getattr(family_module(family), FAMILIES[family][1])


def family_module(family: str):
    """The module of a family ("sd3", "flux"): its `meta_lora_model` and `meta_inputs` (the FLOP model, the activation
    estimate), its policy class."""
    return importlib.import_module(FAMILIES[family][0])


def family(pretrained_model: str):
    """The policy class of `pretrained_model`'s family (nothing loads)."""
    return policy_class(family_name(pretrained_model))


def load_policy(pretrained_model: str, device, lora_rank: int | None, lora_alpha: float = 0.0,
                guidance_scale: float | None = None, amp_dtype=None):
    """The training policy (or, lora_rank None, the plain model) of `pretrained_model`, whatever its family."""
    return family(pretrained_model)(pretrained_model, device, lora_rank, lora_alpha, guidance_scale, amp_dtype)


def load_pipeline(pretrained_model: str, device, dtype):
    """The frozen diffusers pipeline of `pretrained_model` (StableDiffusion3Pipeline or FluxPipeline)."""
    return family(pretrained_model).load_pipeline(pretrained_model, device, dtype)


def default_guidance(pretrained_model: str) -> float:
    """The guidance a model samples and trains with when none is given (SD3: 1, no CFG; FLUX.1-dev: 3.5)."""
    return family(pretrained_model).DEFAULT_GUIDANCE


def is_tiny(pretrained_model: str | None) -> bool:
    """Whether `pretrained_model` is one of the built-in tiny offline models (sampled at its checkpoint's training
    settings, run on one CPU thread: fdfo/threads.py)."""
    return pretrained_model in TINY


def recorded_family(recorded: str | None, pretrained_model: str | None) -> str | None:
    """The family a checkpoint was trained on: what its state.json records ("model_family"), else its recorded base
    model's, else None (a checkpoint from elsewhere)."""
    if recorded is not None:
        return recorded
    try:
        return family_name(pretrained_model) if pretrained_model else None
    except ValueError:  # a recorded name this version does not know: nothing to compare
        return None


def check_family(description: str, family: str | None, trained_on: str | None, pretrained_model: str) -> None:
    """Refuse, in one line, a checkpoint of one model family loaded onto a model of another (`family`: the checkpoint's,
    `recorded_family`; None: not known, nothing to check)."""
    target = family_name(pretrained_model)
    if family is None or family == target:
        return
    label = LABELS.get(family, family)
    article = "an" if label == "SD3" else "a"
    fix = f"--pretrained-model {trained_on}" if trained_on else f"--pretrained-model with {article} {label} model"
    raise ValueError(f"checkpoint {description} is a LoRA of {article} {label} model, not of the {LABELS[target]} "
                     f"model {pretrained_model}: pass {fix}")
