"""Diversity at equal reward (docs/toy.md): from the fresh-seed curves of a sweep (`python -m fdfo.toy.sweep`), the
diversity of each run at the moment its reward first covers a given fraction of its own gap, compared between methods
seed by seed, and one plot of diversity against that fraction.

`python -m fdfo.toy.diversity --sweep runs/toy_sweep --settings 2d 2d_quantised d64 --plot docs/toy_diversity.png`
writes <sweep>/diversity-<setting>.json per setting and the plot, and prints the tables as markdown.

A reward level is a fraction f of the gap between a seed's starting reward r0 (the base flow, the same for every
method) and the best possible reward r*: the level r0 + f (r* - r0). A run's diversity at f is read at the first
crossing of that level, linearly interpolated in reward between the two evaluation points around it (the run's reward
is below the level at the first and at or above it at the second); a run that never reaches the level (or diverged
before) has none. Method A dominates B at f when both reach f on every seed and A's diversity is higher on every seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fdfo.cli import tool_main
from fdfo.outputs import check_output_path, save_figure, write_text
from fdfo.threads import single_thread_if_tiny
from fdfo.toy.checks import strict_json
from fdfo.toy.curves import COLORS, collect, gap_fractions
from fdfo.toy.sweep import GRID, SETTINGS, best_reward

LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
KEYS = ("pairwise", "modes")


@dataclass
class DiversityConfig:
    sweep: str = "runs/toy_sweep"
    """Folder of a finished sweep (its <setting>.json files)."""
    settings: tuple[str, ...] = ("2d", "2d_quantised", "d64")
    """Which settings of the sweep."""
    plot: str = "runs/toy_sweep/diversity.png"
    """Where to write the plot of diversity against reward (one column per setting)."""
    runs: str = ""
    """If set: the output folder of `python -m fdfo.toy.budget`; a setting with runs of --evaluations there takes its
    curves from those runs (every method found) instead of the sweep's fresh seeds."""
    evaluations: int = 65536
    """The budget of the runs read from --runs."""


def at_level(curve: list[dict], key: str, level: float, best: float) -> float | None:
    """The diversity `key` when the run's reward first covers the fraction `level` of its gap (module docstring)."""
    fractions = gap_fractions(curve, best)
    for i, f in enumerate(fractions):
        if f is None or curve[i][key] is None:
            return None  # diverged before reaching the level
        if f >= level:
            if i == 0:
                return curve[0][key]
            w = (level - fractions[i - 1]) / (f - fractions[i - 1])
            return curve[i - 1][key] + w * (curve[i][key] - curve[i - 1][key])
    return None


def dominates(a: list[float | None], b: list[float | None]) -> bool:
    """A's diversity above B's on every seed, both reaching the level on every seed."""
    return all(x is not None and y is not None and x > y for x, y in zip(a, b, strict=True))


def analyse(curves: dict[str, list[list[dict]]], best: float) -> dict:
    """Per key, method and level: the diversity per seed at that level; per key and ordered pair of methods: the
    levels at which the first dominates the second."""
    values = {key: {m: {str(f): [at_level(c, key, f, best) for c in runs] for f in LEVELS}
                    for m, runs in curves.items()} for key in KEYS}
    dominance = {key: {f"{a} > {b}": [f for f in LEVELS if dominates(values[key][a][str(f)], values[key][b][str(f)])]
                       for a in curves for b in curves if a != b} for key in KEYS}
    return {"levels": list(LEVELS), "values": values, "dominance": dominance}


def markdown(result: dict) -> str:
    lines = []
    for key in KEYS:
        methods = list(result["values"][key])
        lines += [f"{key} at the first crossing of each gap fraction (per seed; - = not reached)", "",
                  "| gap fraction | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for f in result["levels"]:
            cells = [" / ".join("-" if v is None else f"{v:.2f}" for v in result["values"][key][m][str(f)])
                     for m in methods]
            lines.append(f"| {f:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"* {pair}: {', '.join(f'{f:.1f}' for f in levels)}"
                  for pair, levels in result["dominance"][key].items() if levels]
        lines.append("")
    return "\n".join(lines)


def plot(curves_by_setting: dict[str, dict[str, list[list[dict]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves_by_setting)
    fig, axes = plt.subplots(len(KEYS), len(names), figsize=(4.2 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        best = best_reward(SETTINGS[name].reward)
        for method, runs in curves_by_setting[name].items():
            for seed, curve in enumerate(runs):
                x = gap_fractions(curve, best)
                # up to the run's best reward: every level it reaches is first crossed by then (a later collapse
                # would only draw back over the plot)
                top = max(range(len(x)), key=lambda i: -math.inf if x[i] is None else x[i])
                curve, x = curve[: top + 1], x[: top + 1]
                for row, key in enumerate(KEYS):
                    y = [math.nan if v is None or c[key] is None else c[key] for v, c in zip(x, curve)]
                    axes[row, col].plot([math.nan if v is None else v for v in x], y, color=COLORS.get(method),
                                        marker=".", markersize=3, linewidth=0.8, alpha=0.8,
                                        label=method if seed == 0 else None)
        start = max(runs[0][0]["pairwise"] for runs in curves_by_setting[name].values())
        axes[0, col].set_ylim(0, 1.1 * start)
        for row, key in enumerate(KEYS):
            ax = axes[row, col]
            ax.set_title(f"{name}: {key}", fontsize=9)
            ax.set_xlabel("fraction of the seed's reward gap closed", fontsize=8)
            ax.set_xlim(-0.4, 1.02)  # a run that fell far below its start (a late collapse) runs off to the left
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("diversity against reward along training, fresh seeds 0, 1, 2 (one line per run, up to its best "
                 "reward)", fontsize=10)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=70)
    finally:
        plt.close(fig)


def diversity(cfg: DiversityConfig) -> None:
    unknown = [name for name in cfg.settings if name not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings {' '.join(unknown)}: no such setting; choose from {' '.join(SETTINGS)}")
    sweep_dir = check_output_path("--sweep", cfg.sweep, folder=True)
    missing = [str(sweep_dir / f"{n}.json") for n in cfg.settings if not (sweep_dir / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"--sweep: {', '.join(missing)} not found; run python -m fdfo.toy.sweep first")
    plot_path = check_output_path("--plot", cfg.plot, folder=False)
    curves = {name: json.loads((sweep_dir / f"{name}.json").read_text())["curves"] for name in cfg.settings}
    if cfg.runs:
        for name in cfg.settings:
            found = collect(Path(cfg.runs) / name, tuple(GRID), cfg.evaluations)
            if found:
                curves[name] = {method: [r["curve"] for r in runs] for method, runs in found.items()}
                print(f"{name}: the runs of {cfg.evaluations} evaluations in {Path(cfg.runs) / name}")
    for name, by_method in curves.items():
        result = analyse(by_method, best_reward(SETTINGS[name].reward))
        write_text(sweep_dir / f"diversity-{name}.json", strict_json(result))
        print(f"### {name}\n\n{markdown(result)}", flush=True)
    plot(curves, plot_path)
    print(f"wrote {plot_path}")


def main(argv: list[str] | None = None) -> None:
    single_thread_if_tiny(True)  # toy flows: one CPU thread unless OMP_NUM_THREADS is set (fdfo/threads.py)
    tool_main(DiversityConfig, diversity, "python -m fdfo.toy.diversity", __doc__, argv)


if __name__ == "__main__":
    main()
