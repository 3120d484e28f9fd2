"""A reward made of named, weighted terms (docs/algorithm.md §7: presets and custom specs both build one)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

Scorer = Callable[[Sequence[str], torch.Tensor], torch.Tensor]  # also has .to(device)


@dataclasses.dataclass(frozen=True)
class Term:
    name: str  # stable log key, e.g. "pickscore", "vlm_alignment"
    weight: float
    scorer: Scorer


class WeightedReward:
    """`sum_k weight_k * score_k(prompts, images)`; `components` also returns every raw (unweighted) score.

    With `offload=True`, `offload()` moves the scorers to CPU (e.g. after a sampling phase) and the next call moves
    them back to `device`; without it `offload()` does nothing. An FSDP-sharded VLM is never moved.
    """

    def __init__(self, terms: Sequence[Term], device: torch.device | str, offload: bool = False):
        names = [term.name for term in terms]
        assert terms and len(set(names)) == len(names) and "reward" not in names, names
        self.terms = tuple(terms)
        self.device = torch.device(device)
        self.offload_enabled = offload
        self._offloaded = False

    @property
    def names(self) -> tuple[str, ...]:
        """Term names in order: the keys of `components` besides "reward"."""
        return tuple(term.name for term in self.terms)

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """The weighted sum, float32 `[B]` on `images.device`."""
        return self.components(prompts, images)["reward"]

    def components(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{term name: raw score [B], ..., "reward": weighted sum [B]}, each float32 on `images.device`."""
        if self._offloaded:
            self.to(self.device)
        scores = {term.name: term.scorer(prompts, images).float() for term in self.terms}
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for term in self.terms:
            total = total + term.weight * scores[term.name]
        return {**scores, "reward": total}

    def to(self, device: torch.device | str) -> "WeightedReward":
        """Move every scorer to `device`, which becomes the device they return to after `offload()`."""
        self.device = torch.device(device)
        for term in self.terms:
            term.scorer.to(self.device)
        self._offloaded = False
        return self

    def offload(self) -> "WeightedReward":
        """Free accelerator memory between scoring phases when offloading is enabled (`--reward.offload`)."""
        if self.offload_enabled and self.device.type != "cpu":
            for term in self.terms:
                term.scorer.to("cpu")
            self._offloaded = True
        return self

    def __repr__(self) -> str:
        return "WeightedReward(" + " + ".join(f"{term.weight:g}*{term.name}" for term in self.terms) + ")"
