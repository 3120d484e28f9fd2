"""Reward kinds, presets and "kind:weight[:question]" specs (docs/algorithm.md §7-§8), and building them into rewards.

Every model is loaded once per build: two CLIP terms of one kind share a model, all VLM terms share one VLM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from rewards.analytic import Brightness, Redness
from rewards.clip import CLIPScorer
from rewards.config import RewardConfig
from rewards.sharding import resolve_vlm_fsdp
from rewards.vlm import ALIGNMENT_QUESTION, EVAL_ALIGNMENT_QUESTION, PHOTO_QUESTION, QUALITY_QUESTION, VLMScorer
from rewards.weighted import Term, WeightedReward

# kind -> (RewardConfig field of the model, field of the processor, name in messages)
CLIP_KINDS = {
    "pickscore": ("pickscore_model", "pickscore_processor", "PickScore"),
    "hpsv2": ("hpsv2_model", "pickscore_processor", "HPSv2"),  # HPSv2 is a ViT-H/14 fine-tune: laion preprocessing
    "clip_h14": ("clip_h14_model", "clip_h14_model", "CLIP ViT-H/14"),
    "clip_l14": ("clip_l14_model", "clip_l14_model", "CLIP ViT-L/14"),
}
# kind -> default question of a training reward term ("vlm" has none: its spec must give one)
VLM_KINDS = {
    "vlm_alignment": ALIGNMENT_QUESTION,  # §7: "... Answer Yes or No."
    "vlm_quality": QUALITY_QUESTION,
    "vlm_photo": PHOTO_QUESTION,
    "vlm": None,
}
# kind -> question of an evaluation metric (§8: every one ends "Answer with Yes or No.")
VLM_METRIC_QUESTIONS = {
    "vlm_alignment": EVAL_ALIGNMENT_QUESTION,
    "vlm_quality": QUALITY_QUESTION,
    "vlm_photo": PHOTO_QUESTION,
}
ANALYTIC_KINDS = {"brightness": Brightness, "redness": Redness}
KINDS = (*CLIP_KINDS, *VLM_KINDS, *ANALYTIC_KINDS)

PRESETS: dict[str, tuple[str, ...]] = {
    "pickscore": ("pickscore:1.0",),
    "vlm_alignment": ("vlm_alignment:1.0",),
    "combined": ("pickscore:1.0", "vlm_alignment:0.1"),  # the paper's default
    "brightness": ("brightness:1.0",),  # analytic, no model: tests
    "redness": ("redness:1.0",),  # analytic, no model: the CPU smoke preset
}
EVAL_METRICS = ("pickscore", "hpsv2", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality", "vlm_photo")

_SPEC_FORMAT = (
    '"kind:weight" or "kind:weight:question", e.g. "pickscore:1.0" or "vlm:0.5:Is there a dog in this image?", '
    f"with kind one of {', '.join(KINDS)}"
)


@dataclasses.dataclass(frozen=True)
class TermSpec:
    kind: str
    weight: float
    question: str | None = None  # VLM kinds only; None: the kind's default question


def parse_spec(spec: str) -> TermSpec:
    """Parse "kind:weight" or "kind:weight:question" (the question may contain colons). ValueError if malformed."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"Bad reward spec {spec!r}: expected {_SPEC_FORMAT}.")
    kind, weight_text = parts[0].strip(), parts[1].strip()
    question = parts[2].strip() if len(parts) == 3 else None
    if kind not in KINDS:
        raise ValueError(f"Bad reward spec {spec!r}: unknown kind {kind!r}; expected {_SPEC_FORMAT}.")
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(f"Bad reward spec {spec!r}: weight {weight_text!r} is not a finite number; {_SPEC_FORMAT}.")
    if question is not None and kind not in VLM_KINDS:
        raise ValueError(f"Bad reward spec {spec!r}: only VLM kinds ({', '.join(VLM_KINDS)}) take a question.")
    if question == "" or (kind == "vlm" and question is None):
        raise ValueError(f'Bad reward spec {spec!r}: give the question after the weight, e.g. "vlm:0.5:Is it sharp?".')
    return TermSpec(kind, weight, question)


def build_reward(preset: str, cfg: RewardConfig, device: torch.device | str) -> WeightedReward:
    """The training reward: `cfg.specs` if given, else the named preset (pickscore, vlm_alignment, combined,
    brightness). Models load from the ids / folders in `cfg` onto `device`."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown reward preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return build_from_specs(cfg.specs or PRESETS[preset], cfg, device)


def build_metrics(names: Sequence[str], cfg: RewardConfig, device: torch.device | str) -> WeightedReward:
    """Evaluation metrics by name (`EVAL_METRICS`), each a weight-1 term: read them from `.components()`.

    VLM metrics ask the §8 questions and feed 8-bit images through the processor's default resize."""
    unknown = [name for name in names if name not in EVAL_METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown reward metric(s) {unknown or list(names)}; choose from {', '.join(EVAL_METRICS)}.")
    return build_from_specs([f"{name}:1.0" for name in names], cfg, device, evaluation=True)


def build_from_specs(
    specs: Sequence[str], cfg: RewardConfig, device: torch.device | str, evaluation: bool = False
) -> WeightedReward:
    """A `WeightedReward` of the given specs; all are parsed (and so checked) before any model loads.

    evaluation: VLM terms without their own question ask the §8 metric question, and every VLM term uses the
    processor's default resize on 8-bit images; otherwise the §7 training path (504 px bilinear)."""
    parsed = [parse_spec(spec) for spec in specs]
    if not parsed:
        raise ValueError(f"A reward needs at least one term: {_SPEC_FORMAT}.")
    if cfg.chunk_size < 1:
        raise ValueError(f"--reward.chunk-size must be >= 1, got {cfg.chunk_size}.")
    device = torch.device(device)
    loaded: dict[str, object] = {}  # kind ("vlm" for all VLM kinds) -> scorer, so every model loads once
    terms, seen = [], {}
    for spec in parsed:
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        name = spec.kind if seen[spec.kind] == 1 else f"{spec.kind}_{seen[spec.kind]}"
        terms.append(Term(name, spec.weight, _scorer(spec, cfg, device, loaded, evaluation)))
    return WeightedReward(terms, device, offload=cfg.offload)


def _scorer(spec: TermSpec, cfg: RewardConfig, device: torch.device, loaded: dict[str, object], evaluation: bool):
    if spec.kind in ANALYTIC_KINDS:
        return ANALYTIC_KINDS[spec.kind]()
    if spec.kind in CLIP_KINDS:
        if spec.kind not in loaded:
            model_option, processor_option, what = CLIP_KINDS[spec.kind]
            loaded[spec.kind] = CLIPScorer.load(
                getattr(cfg, model_option),
                getattr(cfg, processor_option),
                device=device,
                chunk_size=cfg.chunk_size,
                model_option=model_option,
                processor_option=processor_option,
                what=what,
                float_preprocessing=not evaluation,  # §7 training: float on the device; §8 metrics: the processor
            )
        return loaded[spec.kind]
    question = spec.question or (VLM_METRIC_QUESTIONS if evaluation else VLM_KINDS)[spec.kind]
    if "vlm" not in loaded:
        fsdp = resolve_vlm_fsdp(cfg.vlm_fsdp)
        loaded["vlm"] = VLMScorer.load(
            cfg.vlm_model, device=device, chunk_size=cfg.chunk_size, question=question, fsdp=fsdp,
            bf16_buffers=not evaluation and not cfg.vlm_fp32_buffers,  # §7: the authors' training VLM; metrics fp32
        )
    return loaded["vlm"].with_question(question, processor_resize=evaluation)
