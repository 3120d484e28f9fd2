"""Reward models for FDFO (docs/algorithm.md §7-§8), one module per scorer.

A reward is any callable `(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B]` (float32, on the
images' device). `build_reward(preset, cfg, device)` gives the training reward as a `WeightedReward`, whose
`components()` also returns each term's raw score; `build_metrics(names, cfg, device)` gives evaluation metrics.

Modules: clip (PickScore, HPSv2, CLIP H/14, L/14), vlm (Qwen2.5-VL yes/no questions), analytic (brightness, redness),
weighted (the weighted sum), build (kinds, presets, specs), sharding (FSDP for the VLM), config, plugin (users' own
rewards, "plugin:W:file.py:Attr"), remote (the client of a reward server, "remote:W:URL"), serve (the server,
`python -m rewards.serve`), examples (JPEG compressibility, an aesthetic score); docs/rewards.md.
"""

from rewards.build import EVAL_METRICS, KINDS, PRESETS, build_from_specs, build_metrics, build_reward, parse_spec
from rewards.config import RewardConfig
from rewards.weighted import Term, WeightedReward

__all__ = [
    "EVAL_METRICS",
    "KINDS",
    "PRESETS",
    "RewardConfig",
    "Term",
    "WeightedReward",
    "build_from_specs",
    "build_metrics",
    "build_reward",
    "parse_spec",
]
