"""Reward kinds, presets and "kind:weight[:rest]" specs (docs/algorithm.md §7-§8), and building them into rewards.

Every model is loaded once per build: two CLIP terms of one kind share a model, all VLM terms share one VLM. Users'
own rewards are "plugin:WEIGHT:file.py:Attr" / "plugin:WEIGHT:module:Attr" (rewards/plugin.py) and rewards served
elsewhere "remote:WEIGHT:URL" (rewards/remote.py, rewards/serve.py); docs/rewards.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence
from urllib.parse import urlsplit

import torch

from rewards.analytic import Brightness, Redness
from rewards.clip import CLIPScorer
from rewards.config import RewardConfig
from rewards.plugin import build_plugin, load_attribute, split_target
from rewards.remote import TOKEN_ENV, RemoteScorer
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
EXTERNAL_KINDS = ("plugin", "remote")  # "plugin:W:file.py:Attr" or "plugin:W:module:Attr"; "remote:W:URL"
KINDS = (*CLIP_KINDS, *VLM_KINDS, *ANALYTIC_KINDS, *EXTERNAL_KINDS)

PRESETS: dict[str, tuple[str, ...]] = {
    "pickscore": ("pickscore:1.0",),
    "vlm_alignment": ("vlm_alignment:1.0",),
    "combined": ("pickscore:1.0", "vlm_alignment:0.1"),  # the paper's default
    "brightness": ("brightness:1.0",),  # analytic, no model: tests
    "redness": ("redness:1.0",),  # analytic, no model: the CPU smoke preset
}
EVAL_METRICS = ("pickscore", "hpsv2", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality", "vlm_photo")
SMOKE_METRICS = tuple(ANALYTIC_KINDS)  # no model, no download: metrics.py's table, intervals and --compare on CPU

_SPEC_FORMAT = (
    '"kind:weight" or "kind:weight:question", e.g. "pickscore:1.0" or "vlm:0.5:Is there a dog in this image?", '
    f"with kind one of {', '.join(KINDS[:-2])}; or a plug-in \"plugin:weight:file.py:Attr\" / "
    '"plugin:weight:my_pkg.rewards:Attr", or a reward server "remote:weight:http://127.0.0.1:8000"'
)


@dataclasses.dataclass(frozen=True)
class TermSpec:
    kind: str
    weight: float
    question: str | None = None  # VLM kinds only; None: the kind's default question
    target: str | None = None  # plugin: "file.py:Attr" or "module:Attr"; remote: the URL


def parse_spec(spec: str) -> TermSpec:
    """Parse "kind:weight" or "kind:weight:question" (the question may contain colons). ValueError if malformed."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"Bad reward spec {redacted(spec)!r}: expected {_SPEC_FORMAT}.")
    kind, weight_text = parts[0].strip(), parts[1].strip()
    question = parts[2].strip() if len(parts) == 3 else None
    if kind not in KINDS:
        raise ValueError(f"Bad reward spec {redacted(spec)!r}: unknown kind {kind!r}; expected {_SPEC_FORMAT}.")
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(f"Bad reward spec {redacted(spec)!r}: weight {weight_text!r} is not a finite number; "
                         f"{_SPEC_FORMAT}.")
    if kind in EXTERNAL_KINDS:
        return _external_spec(spec, kind, weight, question)
    if question is not None and kind not in VLM_KINDS:
        raise ValueError(f"Bad reward spec {spec!r}: only VLM kinds ({', '.join(VLM_KINDS)}) take a question.")
    if question == "" or (kind == "vlm" and question is None):
        raise ValueError(f'Bad reward spec {spec!r}: give the question after the weight, e.g. "vlm:0.5:Is it sharp?".')
    return TermSpec(kind, weight, question)


def _external_spec(spec: str, kind: str, weight: float, rest: str | None) -> TermSpec:
    if kind == "plugin":
        split_target(spec, rest or "")  # raises for a malformed "file.py:Attr" / "module:Attr"
        return TermSpec(kind, weight, target=rest)
    if not rest or not rest.startswith(("http://", "https://")) or len(rest.split("://", 1)[1]) == 0:
        raise ValueError(f'Bad reward spec {redacted(spec)!r}: a reward server is "remote:WEIGHT:URL" with an http:// '
                         f'or https:// URL, e.g. "remote:1.0:http://127.0.0.1:8000".')
    if "@" in urlsplit(rest).netloc:  # config.json and W&B record the spec: no password may ride in it
        raise ValueError(f"Bad reward spec {redacted(spec)!r}: a reward server URL cannot hold a user name or "
                         f"password (config.json records the URL); set the server's token in {TOKEN_ENV} instead.")
    return TermSpec(kind, weight, target=rest)


def redacted(text: str) -> str:
    """`text` with the user info of any URL in it ("http://user:password@host") replaced by ***."""
    return re.sub(r"(://)[^/@\s]*@", r"\1***@", text)


def check_specs(specs: Sequence[str], cfg: RewardConfig | None = None, resolution: int | None = None
                ) -> list[TermSpec]:
    """The checks that need no model, run before anything loads or is created: every spec parses, every plug-in's
    module imports and has its callable attribute, every reward server answers its health check (and, given the
    image `resolution`, accepts requests of --reward.chunk-size images)."""
    parsed = [parse_spec(spec) for spec in specs]
    cfg = cfg or RewardConfig()
    for text, spec in zip(specs, parsed):
        if spec.kind == "plugin":
            load_attribute(text, *split_target(text, spec.target))
        elif spec.kind == "remote":
            server = RemoteScorer(spec.target, text, cfg.remote_timeout, cfg.remote_retries, cfg.chunk_size).connect()
            if resolution is not None:
                server.check_request_size(resolution)
    return parsed


def training_specs(preset: str, cfg: RewardConfig) -> tuple[str, ...]:
    """The specs a training run uses: `cfg.specs` if given, else the named preset's."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown reward preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return tuple(cfg.specs) or PRESETS[preset]


def build_reward(preset: str, cfg: RewardConfig, device: torch.device | str) -> WeightedReward:
    """The training reward: `cfg.specs` if given, else the named preset (pickscore, vlm_alignment, combined,
    brightness). Models load from the ids / folders in `cfg` onto `device`."""
    return build_from_specs(training_specs(preset, cfg), cfg, device)


def metric_specs(names: Sequence[str]) -> list[str]:
    """Metric names (`EVAL_METRICS`, `SMOKE_METRICS`) and plug-in / server specs ("plugin:1:file.py:Attr",
    "remote:1:URL", the training syntax) -> weight-1 specs; ValueError for anything else. A metric is a raw score,
    so the weight of a spec must be 1 (it would otherwise be ignored)."""
    specs, unknown = [], []
    for name in names:
        kind = name.split(":", 1)[0].strip()
        if kind in EXTERNAL_KINDS:
            spec = parse_spec(name)
            if spec.weight != 1.0:
                raise ValueError(f"metric {name!r}: metrics are raw scores, unweighted; write the weight as 1, e.g. "
                                 f"{kind}:1:{spec.target}.")
            specs.append(name)
        elif name in EVAL_METRICS or name in SMOKE_METRICS:
            specs.append(f"{name}:1.0")
        else:
            unknown.append(name)
    if unknown or not names:
        raise ValueError(f"Unknown reward metric(s) {unknown or list(names)}; choose from "
                         f"{', '.join(EVAL_METRICS + SMOKE_METRICS)}, or a plug-in \"plugin:1:file.py:Attr\" or a "
                         f'reward server "remote:1:URL".')
    return specs


def build_metrics(names: Sequence[str], cfg: RewardConfig, device: torch.device | str) -> WeightedReward:
    """Evaluation metrics by name or spec (`metric_specs`), each a weight-1 term: read them from `.components()`.

    VLM metrics ask the §8 questions and feed 8-bit images through the processor's default resize."""
    return build_from_specs(metric_specs(names), cfg, device, evaluation=True)


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
    for text, spec in zip(specs, parsed):
        scorer = _scorer(text, spec, cfg, device, loaded, evaluation)
        kind = scorer.name if spec.kind in EXTERNAL_KINDS else spec.kind  # a plug-in's own name, or "remote"
        seen[kind] = seen.get(kind, 0) + 1
        terms.append(Term(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}", spec.weight, scorer))
    names = [n for term in terms for n in (term.name, *getattr(term.scorer, "component_names", ()))]
    twice = sorted({n for n in names if names.count(n) > 1} | ({"reward"} & set(names)))
    if twice:
        raise ValueError(f"reward specs {list(specs)} give the score name(s) {', '.join(twice)} twice (a plug-in's "
                         f"name or a server's term equals another term's; 'reward' is the weighted sum): rename one.")
    return WeightedReward(terms, device, offload=cfg.offload)


def _scorer(text: str, spec: TermSpec, cfg: RewardConfig, device: torch.device, loaded: dict[str, object],
            evaluation: bool):
    if spec.kind == "plugin":
        return build_plugin(text, spec.target, device, cfg.chunk_size)
    if spec.kind == "remote":
        return RemoteScorer(spec.target, text, cfg.remote_timeout, cfg.remote_retries, cfg.chunk_size).connect()
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
