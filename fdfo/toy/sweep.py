"""The comparison of docs/toy.md: tune each method's learning rate and trust-region constant on held-out seeds,
then run the chosen settings on fresh seeds: 2-D with one prompt (smooth reward, and the black-box quantised one)
and d = 256 with 64 prompts, d = 64 with 16 (d256_16k, d256 tuned at 16,384 evaluations, runs only when named).

`OMP_NUM_THREADS=1 python -m fdfo.toy.sweep --out runs/toy_sweep` (about 8 CPU-minutes); writes <setting>.json and
<setting>.png per setting. Selection: the highest mean final reward over the tuning seeds. A run that diverges (its
evaluated reward became NaN or infinite) is recorded as diverged (its final reward null, `diverged` the evaluations it
had spent) and is never selected; the JSON files are strict JSON (null, never NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo.cli import tool_main
from fdfo.outputs import check_output_path, save_figure, write_text
from fdfo.threads import single_thread_if_tiny
from fdfo.toy.checks import finite_or_none, strict_json
from fdfo.toy.run import ToyConfig, run

SETTINGS = {
    "2d": ToyConfig(dim=2, prompts=1, samples_per_epoch=32, evaluations=2048, eval_per_prompt=64, eval_every=4),
    "2d_quantised": ToyConfig(dim=2, prompts=1, reward="quantised", samples_per_epoch=32, evaluations=2048,
                              eval_per_prompt=64, eval_every=4),
    "d256": ToyConfig(dim=256, prompts=64, samples_per_epoch=128, evaluations=4096, eval_per_prompt=8, eval_every=2),
    "d64": ToyConfig(dim=64, prompts=16, samples_per_epoch=128, evaluations=4096, eval_per_prompt=32, eval_every=2),
    # d256 tuned at four times the budget (docs/toy.md, "Claim (b) across dimension"); not in the default --settings
    "d256_16k": ToyConfig(dim=256, prompts=64, samples_per_epoch=128, evaluations=16384, eval_per_prompt=8,
                          eval_every=2),
}
# Each method's grid of learning rate and trust-region constant(s), the published trust region included. FDFO's grid
# reaches past its published clip and churn because a trial run showed those to limit it on this toy (docs/toy.md).
GRID = {
    "fdfo": [{"lr": lr, "clip": c, "churn": g}
             for lr in (1e-3, 3e-3) for c in (0.03, 0.3) for g in (0.0025, 0.05, 0.2)],
    "fdfo_velocity": [{"lr": lr, "clip": c, "churn": g}
                      for lr in (1e-3, 3e-3) for c in (0.03, 0.1, 0.3) for g in (0.0025, 0.05)],
    "flow_grpo": [{"lr": lr, "clip": c} for lr in (1e-3, 3e-3) for c in (1e-4, 1e-2, 1e-1)],
    "diffusion_nft": [{"lr": lr, "nft_beta": b} for lr in (1e-3, 3e-3) for b in (1.0, 0.1)],
    "backprop": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)],
}
# A method of the grid that is not an --algorithm: the algorithm it runs and its fixed knobs.
VARIANTS = {"fdfo_velocity": ("fdfo", {"trust_region": "velocity"})}  # the opt-in trust region in velocity units
TUNE_SEEDS = (100, 101)
FRESH_SEEDS = (0, 1, 2)
LEVELS = (0.25, 0.5, 0.75)
KEPT = ("tune_finals", "mean", "diverged")  # the tuning record's fields beside the knobs


@dataclass
class SweepConfig:
    out: str = "runs/toy_sweep"
    """Output folder."""
    settings: tuple[str, ...] = ("2d", "2d_quantised", "d256", "d64")
    """Which settings to run."""
    cosine_batches: int = 32
    """Batches for the direction analysis on the fresh seeds."""
    report_only: bool = False
    """Recompute the tables and plots from the JSON files already in --out instead of running."""


def _final(result: dict) -> float | None:
    """The final reward; None for a run that diverged."""
    return result["final"]["reward"]


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when a run diverged (a setting that diverges on a tuning seed is never chosen)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def method_config(base: ToyConfig, method: str, **knobs) -> ToyConfig:
    """The run of one grid method (an --algorithm or one of VARIANTS) with the given knobs on a setting."""
    algorithm, fixed = VARIANTS.get(method, (method, {}))
    return dataclasses.replace(base, algorithm=algorithm, **fixed, **knobs)


def best_reward(reward: str) -> float:
    """The best possible reward: 0 for smooth (every sample on the target), 1 for the bump and its quantised form."""
    return 0.0 if reward == "smooth" else 1.0


def evals_to_reach(curve: list[dict], level: float) -> int | None:
    return next((c["evaluations"] for c in curve if c["reward"] is not None and c["reward"] >= level), None)


def sweep_setting(name: str, base: ToyConfig, cosine_batches: int) -> dict:
    tuned, fresh = {}, {}
    for algorithm, grid in GRID.items():
        scores = []
        for knobs in grid:
            runs = [run(method_config(base, algorithm, seed=s, **knobs)) for s in TUNE_SEEDS]
            finals = [_final(r) for r in runs]
            scores.append({**knobs, "tune_finals": finals, "mean": _mean(finals),
                           "diverged": [r["diverged"] for r in runs]})
            print(name, algorithm, scores[-1], flush=True)
        best = max(scores, key=lambda s: -math.inf if s["mean"] is None else s["mean"])
        tuned[algorithm] = {"grid": scores, "best": best}
        knobs = {k: v for k, v in best.items() if k not in KEPT}
        fresh[algorithm] = [run(method_config(base, algorithm, seed=s, cosine_batches=cosine_batches, **knobs))
                            for s in FRESH_SEEDS]
    summary = {"base": dataclasses.asdict(base), "tuning": tuned,
               "curves": {a: [r["curve"] for r in runs] for a, runs in fresh.items()},
               "cosine": {a: [r.get("cosine") for r in runs] for a, runs in fresh.items()},
               "diverged": {a: [r["diverged"] for r in runs] for a, runs in fresh.items()},
               "settings": {a: {k: v for k, v in t["best"].items() if k not in KEPT}
                            for a, t in tuned.items()}}
    summary["table"] = tabulate(summary)
    return summary


def tabulate(summary: dict) -> dict:
    """Per method on the fresh seeds: final reward (mean, std, per seed), evaluations to close a fraction f of each
    seed's own gap between its starting reward and the best reward possible (0 for smooth, 1 for bump), diversity
    and direction cosines."""
    best_possible = best_reward(summary["base"]["reward"])
    table = {}
    for algorithm, curves in summary["curves"].items():
        finals = torch.tensor([math.nan if c[-1]["reward"] is None else c[-1]["reward"] for c in curves])
        reach = {}
        for f in LEVELS:
            reach[str(f)] = [evals_to_reach(c, c[0]["reward"] + f * (best_possible - c[0]["reward"])) for c in curves]
        table[algorithm] = {
            "settings": summary["settings"][algorithm],
            "start_reward_per_seed": [c[0]["reward"] for c in curves],
            "final_reward_mean": finals.mean().item(), "final_reward_std": finals.std().item(),
            "final_reward_per_seed": finals.tolist(), "evals_to_reach": reach,
            "diverged": summary.get("diverged", {}).get(algorithm, [None] * len(curves)),
            **{key: [c[-1][key] for c in curves] for key in ("modes", "spread", "pairwise")},
            "cosine": summary["cosine"][algorithm],
        }
    return finite_or_none(table)  # a diverged seed: its final reward, and the mean and std, are null


def markdown(summary: dict) -> str:
    """The fresh-seed table of one setting as markdown (docs/toy.md pastes it)."""
    def _num(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def fmt(values: list, digits: int = 2) -> str:
        return " / ".join("-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)

    header = ("| method | tuned settings | final reward mean ± std (per seed) | evals to close 25 / 50 / 75 % of the"
              " gap (per seed; - = not reached) | modes | spread | pairwise | cosine expected (per-batch mean) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for algorithm, row in summary["table"].items():
        reach = "; ".join(fmt(row["evals_to_reach"][str(f)]) for f in LEVELS)
        knobs = ", ".join(f"{k} {v:g}" for k, v in row["settings"].items())
        cos = " / ".join(f"{_num(c['expected'], 3)} ({_num(c['per_batch_mean'], 2)})" if c else "-"
                         for c in row["cosine"])
        mean = "diverged" if row["final_reward_mean"] is None else \
            f"{row['final_reward_mean']:.3f} ± {_num(row['final_reward_std'], 3)}"
        lines.append(f"| {algorithm} | {knobs} | {mean} "
                     f"({fmt(row['final_reward_per_seed'], 3)}) | {reach} | {fmt(row['modes'], 1)} | "
                     f"{fmt(row['spread'])} | {fmt(row['pairwise'])} | {cos} |")
    return "\n".join(lines)


def plot(name: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for algorithm, curves in summary["curves"].items():
        evals = [c["evaluations"] for c in max(curves, key=len)]
        for ax, key in zip(axes, ("reward", "modes", "pairwise")):
            # a diverged run stops early and has a non-finite last reward: it blanks the mean from there on
            values = torch.full((len(curves), len(evals)), float("nan"))
            for i, curve in enumerate(curves):
                values[i, : len(curve)] = torch.tensor([math.nan if c[key] is None else c[key] for c in curve])
            values[~torch.isfinite(values)] = float("nan")
            mean, std = values.mean(0), values.std(0)
            ax.plot(evals, mean, label=algorithm)
            ax.fill_between(evals, mean - std, mean + std, alpha=0.2)
            ax.set_title(key)
            ax.set_xlabel("reward evaluations")
    axes[0].legend()
    fig.suptitle(f"toy {name}: mean and std over {len(FRESH_SEEDS)} fresh seeds")
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    single_thread_if_tiny(True)  # toy flows: one CPU thread unless OMP_NUM_THREADS is set (fdfo/threads.py)
    tool_main(SweepConfig, sweep, "python -m fdfo.toy.sweep", __doc__, argv)


def sweep(cfg: SweepConfig) -> None:
    unknown = [name for name in cfg.settings if name not in SETTINGS]
    if unknown:
        raise ValueError(f"--settings {' '.join(unknown)}: no such setting; choose from {' '.join(SETTINGS)}")
    if cfg.cosine_batches < 0:
        raise ValueError(f"--cosine-batches must be >= 0 (0: no direction measurement), got {cfg.cosine_batches}")
    out = check_output_path("--out", cfg.out, folder=True)
    if cfg.report_only:
        missing = [name for name in cfg.settings if not (out / f"{name}.json").is_file()]
        if missing:
            raise FileNotFoundError(f"--report-only: {', '.join(str(out / f'{m}.json') for m in missing)} not found; "
                                    "run the sweep first (without --report-only)")
    for name in cfg.settings:
        if cfg.report_only:
            summary = json.loads((out / f"{name}.json").read_text())
            summary["table"] = tabulate(summary)
            write_text(out / f"{name}.json", strict_json(summary))
            plot(name, summary, out / f"{name}.png")
            print(f"### {name}\n\n{markdown(summary)}\n")
            continue
        t0 = time.process_time()
        summary = sweep_setting(name, SETTINGS[name], cfg.cosine_batches)
        summary["cpu_seconds"] = time.process_time() - t0
        write_text(out / f"{name}.json", strict_json(summary))
        plot(name, summary, out / f"{name}.png")
        print(name, json.dumps(finite_or_none(summary["table"]), indent=1), flush=True)


if __name__ == "__main__":
    main()
