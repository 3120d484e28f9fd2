"""Claim (b) at larger budgets (docs/toy.md, "Claim (b) across dimension"): each method's settings tuned by the sweep
(`python -m fdfo.toy.sweep`, its <setting>.json) run on the fresh seeds for a larger budget of reward evaluations;
per method and seed the evaluations to close 25 % and 50 % of the gap, and their ratio between the methods.

`OMP_NUM_THREADS=1 python -m fdfo.toy.budget --sweep runs/toy_sweep --settings d64 --evaluations 32768
--out runs/toy_budget` writes one JSON per run (<out>/<setting>/<method>-seed<s>.json, written when the run ends, so
--methods / --seeds can split the work between processes) and then <out>/<setting>-<evaluations>.json with the table
of every run found there for that budget, printed as markdown. `--report-only` only re-reads the runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fdfo.cli import tool_main
from fdfo.outputs import check_output_path, save_figure, write_text
from fdfo.threads import single_thread_if_tiny
from fdfo.toy.checks import strict_json
from fdfo.toy.curves import COLORS, collect, gap_fractions
from fdfo.toy.run import run
from fdfo.toy.sweep import FRESH_SEEDS, GRID, SETTINGS, best_reward, evals_to_reach, method_config

LEVELS = (0.25, 0.5)
RATIO = ("fdfo", "flow_grpo", "diffusion_nft")  # the ratio FDFO : Flow-GRPO : DiffusionNFT, FDFO = 1


@dataclass
class BudgetConfig:
    sweep: str = "runs/toy_sweep"
    """Folder of a finished sweep: the tuned settings are read from its <setting>.json."""
    out: str = "runs/toy_budget"
    """Output folder."""
    settings: tuple[str, ...] = ("d256", "d64")
    """Which settings of the sweep."""
    methods: tuple[str, ...] = ("fdfo", "flow_grpo", "diffusion_nft")
    """Which methods (any of the sweep's grid)."""
    seeds: tuple[int, ...] = FRESH_SEEDS
    """Seeds to run."""
    evaluations: int = 32768
    """Budget of reward evaluations of every run."""
    eval_every: int = 0
    """Evaluate every this many epochs (0: the setting's)."""
    report_only: bool = False
    """Tabulate the runs already in --out for this budget instead of running."""
    plot: str = ""
    """If set: a PNG of each run's fraction of the gap closed against reward evaluations, one panel per setting."""


def gap_fraction(curve: list[dict], best: float) -> float | None:
    """The fraction of the gap between the run's starting reward and `best` that its last reward has closed."""
    start, last = curve[0]["reward"], curve[-1]["reward"]
    return None if last is None else (last - start) / (best - start)


def peak(curve: list[dict], best: float) -> tuple[float, int]:
    """The largest fraction of the gap closed at any evaluation point, and the evaluations spent there (the first)."""
    points = [(f, c["evaluations"]) for f, c in zip(gap_fractions(curve, best), curve) if f is not None]
    fraction = max(f for f, _ in points)
    return fraction, next(e for f, e in points if f == fraction)


def mean_bound(values: list[int | None], budget: int) -> tuple[float, bool]:
    """The mean over seeds of the evaluations to a level, and whether it is only a lower bound: a seed that did not
    reach the level within the budget counts as the budget."""
    return sum(budget if v is None else v for v in values) / len(values), any(v is None for v in values)


def ratio(means: dict[str, tuple[float, bool]]) -> str:
    """'1 : a : b' relative to the first method; '>a' where only the other method's mean is a lower bound, '<a'
    where only the first one's is, '?' where both are."""
    (first, first_low), parts = next(iter(means.values())), ["1"]
    for value, low in list(means.values())[1:]:
        prefix = "?" if low and first_low else ">" if low else "<" if first_low else ""
        parts.append("?" if prefix == "?" else f"{prefix}{value / first:.2g}")
    return " : ".join(parts)


def tabulate(runs: dict[str, list[dict]], budget: int, best: float) -> dict:
    """Per method: tuned knobs, final reward and fraction of the gap closed per seed, evaluations to each level per
    seed and their mean (a lower bound where a seed did not reach it); the ratio of the means over RATIO."""
    table = {}
    for method, results in runs.items():
        curves = [r["curve"] for r in results]
        reach = {str(f): [evals_to_reach(c, c[0]["reward"] + f * (best - c[0]["reward"])) for c in curves]
                 for f in LEVELS}
        table[method] = {
            "seeds": [r["config"]["seed"] for r in results], "knobs": results[0]["knobs"],
            "final_reward": [c[-1]["reward"] for c in curves], "gap_closed": [gap_fraction(c, best) for c in curves],
            "peak": [peak(c, best) for c in curves],
            "diverged": [r["diverged"] for r in results], "evals_to_reach": reach,
            "mean_evals": {f: mean_bound(v, budget) for f, v in reach.items()},
            "cpu_seconds": [r["cpu_seconds"] for r in results],
        }
    ratios = {}
    if all(m in table for m in RATIO):
        ratios = {str(f): ratio({m: table[m]["mean_evals"][str(f)] for m in RATIO}) for f in LEVELS}
    return {"budget": budget, "methods": table, "ratio": ratios}


def markdown(summary: dict) -> str:
    def fmt(values: list, digits: int = 3) -> str:
        return " / ".join("-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)

    budget = summary["budget"]
    lines = [f"budget {budget} reward evaluations per run",
             "| method | tuned settings | final reward (per seed) | gap closed at the end | most gap closed (at evals) "
             "| evals to 25 % (per seed; mean) | evals to 50 % (per seed; mean) |", "|---|---|---|---|---|---|---|"]
    for method, row in summary["methods"].items():
        knobs = ", ".join(f"{k} {v:g}" for k, v in row["knobs"].items())
        reach = [f"{fmt(row['evals_to_reach'][str(f)])}; {'>' if low else ''}{mean:.0f}"
                 for f, (mean, low) in ((f, row["mean_evals"][str(f)]) for f in LEVELS)]
        best = " / ".join(f"{f:.2f} ({e})" for f, e in row["peak"])
        lines.append(f"| {method} | {knobs} | {fmt(row['final_reward'])} | {fmt(row['gap_closed'], 2)} | {best} | "
                     f"{reach[0]} | {reach[1]} |")
    for f, text in summary["ratio"].items():
        lines.append(f"\nratio of mean evaluations to {float(f):.0%}, {' : '.join(RATIO)} = {text} (>: at least, the "
                     f"slower method did not reach it on every seed within {budget}; <: at most; ?: neither did)")
    return "\n".join(lines)


def plot(runs_by_setting: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs_by_setting)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        best = best_reward(SETTINGS[name].reward)
        for method, results in runs_by_setting[name].items():
            for i, r in enumerate(results):
                x = [c["evaluations"] for c in r["curve"]]
                y = [math.nan if v is None else v for v in gap_fractions(r["curve"], best)]
                ax.plot(x, y, color=COLORS.get(method), linewidth=0.8, label=method if i == 0 else None)
        for level in LEVELS:
            ax.axhline(level, color="black", linewidth=0.5, linestyle=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("reward evaluations", fontsize=8)
        ax.set_ylabel("fraction of the gap closed", fontsize=8)
        ax.set_ylim(-0.5, 1.0)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("tuned settings, fresh seeds 0, 1, 2 (one line per run)", fontsize=10)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=70)
    finally:
        plt.close(fig)


def budget_runs(cfg: BudgetConfig) -> None:
    unknown = [name for name in cfg.settings if name not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings {' '.join(unknown)}: no such setting; choose from {' '.join(SETTINGS)}")
    unknown = [name for name in cfg.methods if name not in GRID]
    if unknown:
        raise ValueError(f"--methods {' '.join(unknown)}: no such method; choose from {' '.join(GRID)}")
    if cfg.evaluations < 1 or cfg.eval_every < 0:
        raise ValueError(f"--evaluations must be >= 1 and --eval-every >= 0 (0: the setting's), got "
                         f"{cfg.evaluations} and {cfg.eval_every}")
    sweep_dir = Path(cfg.sweep)
    missing = [str(sweep_dir / f"{name}.json") for name in cfg.settings if not (sweep_dir / f"{name}.json").is_file()]
    if missing and not cfg.report_only:
        raise FileNotFoundError(f"--sweep: {', '.join(missing)} not found; run python -m fdfo.toy.sweep first")
    out = check_output_path("--out", cfg.out, folder=True)
    plot_path = check_output_path("--plot", cfg.plot, folder=False) if cfg.plot else None
    found = {}
    for name in cfg.settings:
        base = SETTINGS[name]
        if not cfg.report_only:
            tuned = json.loads((sweep_dir / f"{name}.json").read_text())["settings"]
            absent = [m for m in cfg.methods if m not in tuned]
            if absent:
                raise ValueError(f"--methods {' '.join(absent)}: not tuned in {sweep_dir / f'{name}.json'}")
            for method in cfg.methods:
                for seed in cfg.seeds:
                    t0 = time.process_time()
                    result = run(method_config(base, method, seed=seed, evaluations=cfg.evaluations,
                                               eval_every=cfg.eval_every or base.eval_every, **tuned[method]))
                    result.update(knobs=tuned[method], cpu_seconds=time.process_time() - t0)
                    write_text(out / name / f"{method}-seed{seed}.json", strict_json(result))
                    print(name, method, seed, result["final"], f"{result['cpu_seconds']:.0f} CPU-s", flush=True)
        found[name] = collect(out / name, cfg.methods, cfg.evaluations)
        summary = tabulate(found[name], cfg.evaluations, best_reward(base.reward))
        write_text(out / f"{name}-{cfg.evaluations}.json", strict_json(summary))
        print(f"### {name}\n\n{markdown(summary)}\n", flush=True)
    if plot_path is not None:
        plot(found, plot_path)
        print(f"wrote {plot_path}")


def main(argv: list[str] | None = None) -> None:
    single_thread_if_tiny(True)  # toy flows: one CPU thread unless OMP_NUM_THREADS is set (fdfo/threads.py)
    tool_main(BudgetConfig, budget_runs, "python -m fdfo.toy.budget", __doc__, argv)


if __name__ == "__main__":
    main()
