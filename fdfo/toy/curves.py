"""A toy run's reward curve measured against its setting's best reward, the runs of one budget found on disk, and the
methods' plot colours: what the budget runs (fdfo.toy.budget) and diversity at equal reward (fdfo.toy.diversity)
both read."""

from __future__ import annotations

import json
from pathlib import Path

COLORS = {"fdfo": "tab:blue", "fdfo_velocity": "tab:cyan", "flow_grpo": "tab:red", "diffusion_nft": "tab:green",
          "backprop": "tab:gray"}


def gap_fractions(curve: list[dict], best: float) -> list[float | None]:
    """Each evaluation point's reward as the fraction of the gap from the run's starting reward to `best`."""
    start = curve[0]["reward"]
    return [None if c["reward"] is None else (c["reward"] - start) / (best - start) for c in curve]


def collect(folder: Path, methods: tuple[str, ...], budget: int) -> dict[str, list[dict]]:
    """The runs of this budget found in `folder`, per method in the order of `methods`, by seed."""
    runs: dict[str, list[dict]] = {}
    for method in methods:
        found = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{method}-seed*.json"))]
        found = sorted((r for r in found if r["config"]["evaluations"] == budget), key=lambda r: r["config"]["seed"])
        if found:
            runs[method] = found
    return runs
