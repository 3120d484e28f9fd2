"""A reward made of named, weighted terms (docs/algorithm.md §7: presets and custom specs both build one).

A scorer is any callable `(prompts, images) -> [B]` with `.to(device)`. The model-based scorers also split a call
into three steps, so that the CPU work can overlap the sampling of the next batch (fdfo/scoring.py):
- `stage(images) -> Tensor`: device-side image work (resize, clamp, 8-bit rounding), no host sync; present only on
  scorers that prepare on the host, and what is copied to the host for them;
- `prepare(prompts, staged) -> inputs`: CPU work only (processors, tokenisation) on `staged`, on the host or the
  device: no model, no device work, no collective, no randomness, so a worker thread may run it;
- `score(inputs) -> [B]`: the model forwards, on the model's device (collective for an FSDP-sharded VLM).
`scorer(prompts, images)` is `score(prepare(prompts, stage(images)))` moved to `images.device`. A scorer without
`stage` prepares on the images themselves; one without `prepare` / `score` (a plain callable) is simply called.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from fdfo.errors import RunError
from rewards.common import check_batch

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
        names = [n for term in terms for n in (term.name, *getattr(term.scorer, "component_names", ()))]
        assert terms and len(set(names)) == len(names) and "reward" not in names, names
        self.terms = tuple(terms)
        self.device = torch.device(device)
        self.offload_enabled = offload
        self._offloaded = False

    @property
    def names(self) -> tuple[str, ...]:
        """Term names in order, each followed by its scorer's `component_names` (a reward server's terms): the keys of
        `components` besides "reward"."""
        return tuple(n for term in self.terms for n in (term.name, *getattr(term.scorer, "component_names", ())))

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """The weighted sum, float32 `[B]` on `images.device`."""
        return self.components(prompts, images)["reward"]

    def components(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{term name: raw score [B], ..., "reward": weighted sum [B]}, each float32 on `images.device`."""
        staged = self.stage(prompts, images)
        return self.score_components(self.prepare_components(prompts, staged, images), images.device)

    def stage(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Check the batch and run the device-side image work: {term name: staged tensor} for the terms that prepare
        on the host (scorers with `stage`), each where `images` is. Issues no host sync."""
        check_batch(prompts, images)
        staged = {}
        for term in self.terms:
            if hasattr(term.scorer, "stage"):
                with term_errors(term.name):
                    staged[term.name] = term.scorer.stage(images)
        return staged

    def prepare_components(
        self, prompts: Sequence[str], staged: dict[str, torch.Tensor], images: torch.Tensor
    ) -> dict[str, object]:
        """{term name: its model inputs}: the CPU work, safe in a worker thread. `staged` is `stage`'s dict, on the
        host or still on the device; `images` is handed untouched to the terms without `stage`, which read it in
        `score_components`."""
        prepared = {}
        for term in self.terms:
            with term_errors(term.name):
                prepared[term.name] = _prepare(term.scorer, prompts, staged.get(term.name, images))
        return prepared

    def score_components(self, prepared: dict[str, object], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The model forwards of `prepare_components`'s inputs: `components`' dict, each float32 on `device`."""
        if self._offloaded:
            self.to(self.device)
        scores = {}
        for term in self.terms:
            with term_errors(term.name):
                scores |= _named(term, _score(term.scorer, prepared[term.name]), device)
        total = torch.zeros_like(scores[self.terms[0].name])
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


class RewardTermError(RuntimeError):
    """An exception raised inside a reward term's code. Not a user error: the entry point lets it through with its
    traceback, and the original exception (a library's ValueError, say) is chained below it as its cause."""


@contextlib.contextmanager
def term_errors(name: str) -> Iterator[None]:
    """Name the reward term an exception comes from, keeping its traceback (`raise ... from`). The run's own errors
    (RunError: a full disk, a NaN guard) pass through as they are."""
    try:
        yield
    except RunError:
        raise
    except Exception as e:
        raise RewardTermError(f"reward term {name!r} raised {type(e).__name__}: {e}") from e


def _prepare(scorer: Scorer, prompts: Sequence[str], images: torch.Tensor) -> object:
    return scorer.prepare(prompts, images) if hasattr(scorer, "prepare") else (prompts, images)


def _score(scorer: Scorer, inputs: object) -> torch.Tensor:
    return scorer.score(inputs) if hasattr(scorer, "score") else scorer(*inputs)


def _named(term: Term, scores: torch.Tensor | dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """{term name: score [B]}; a scorer with `component_names` (rewards/remote.py) answers {component: [B], ...,
    "reward": its weighted sum}: the sum is the term's score and each component is kept under its own name."""
    if not isinstance(scores, dict):
        return {term.name: scores.float().to(device)}
    parts = {term.name: scores["reward"]} | {n: scores[n] for n in term.scorer.component_names}
    return {k: v.float().to(device) for k, v in parts.items()}
