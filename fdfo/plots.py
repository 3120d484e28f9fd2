"""The reward curve of a run, drawn from its log.jsonl: one panel per reward series (the weighted total `reward` and
each component, mean +- std over the epoch's samples, with the held-out evaluation's mean beside it: the total with
its 95 % interval, fdfo/heldout.py), one for the SPO clip fraction and, for FDFO runs, two for the branch-separation
and trust-region diagnostics (docs/toy.md, "Diagnostics on SD3 runs"), against the epoch.

    python -m fdfo.plots runs/00001-fdfo                      # writes runs/00001-fdfo/reward_curve.png
    python -m fdfo.plots runs/00001-fdfo/log.jsonl out.png    # a log file and another output

Matplotlib's Agg canvas is used directly (no pyplot, no display, no global backend state).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fdfo.files import atomic_path
from fdfo.heldout_config import HELDOUT_KEY

Series = dict[str, list[float]]
# panel -> quantile keys of fdfo/diagnostics.py drawn in it
DIAGNOSTICS = {"branch_rms": ("branch_rms_p25", "branch_rms_p50", "branch_rms_p75"),
               "ratio_dev": ("ratio_dev_p50", "ratio_dev_p90")}


def _number(value) -> float:
    """A logged value as a float; None, strings and other non-numbers become NaN (a gap in the line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def read_epoch_records(log_path: str | os.PathLike, heldout: bool = False) -> list[dict]:
    """The epoch records of a log (those without a `step`), one per epoch, sorted by epoch; with `heldout`, the
    held-out evaluations' records instead (those with `heldout_reward_mean`).

    A resumed run may log an epoch twice (the epoch that was running when it stopped): the last record wins. A line
    that is not JSON (a crash in mid-write) is skipped.
    """
    by_epoch = {}
    for line in Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines():  # bad bytes: a bad line
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(record, dict) and "step" not in record and isinstance(record.get("epoch"), int)
                and (HELDOUT_KEY in record) == heldout):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def reward_series(records: list[dict]) -> dict[str, Series]:
    """`{name: {"epoch", "mean", "std"}}` for `reward` first, then every component in order of first appearance, and
    `{"clipfrac": {"epoch", "value"}}`; if any record has them, `{"branch_rms": {"epoch", "branch_rms_p25", ...},
    "dx_sq_mean": {"epoch", "value"}, "ratio_dev": {"epoch", "ratio_dev_p50", "ratio_dev_p90"}}` (`DIAGNOSTICS`). A
    component or diagnostic missing from an epoch's record is NaN there. A reward series is a `<name>_mean` key with a
    `<name>_std` beside it (so `dx_sq_mean` is not one)."""
    names = []
    for record in records:
        for key in record:
            name = key[:-len("_mean")]
            if key.endswith("_mean") and f"{name}_std" in record and name not in names:
                names.append(name)
    names.sort(key=lambda n: n != "reward")  # stable: the total first, components in log order
    epochs = [float(r["epoch"]) for r in records]
    out = {name: {"epoch": epochs, "mean": [_number(r.get(f"{name}_mean")) for r in records],
                  "std": [_number(r.get(f"{name}_std")) for r in records]} for name in names}
    out["clipfrac"] = {"epoch": epochs, "value": [_number(r.get("clipfrac")) for r in records]}
    if any("dx_sq_mean" in r or any(k in r for keys in DIAGNOSTICS.values() for k in keys) for r in records):
        for panel, keys in DIAGNOSTICS.items():
            out[panel] = {"epoch": epochs} | {k: [_number(r.get(k)) for r in records] for k in keys}
        out["dx_sq_mean"] = {"epoch": epochs, "value": [_number(r.get("dx_sq_mean")) for r in records]}
    return out


def heldout_series(records: list[dict]) -> dict[str, Series]:
    """`{name: {"epoch", "mean", "ci95"}}` of the held-out records (`read_epoch_records(..., heldout=True)`): every
    `heldout_<name>_mean`, with the half-width `heldout_reward_ci95` for the total (0 for the terms: not logged)."""
    names = dict.fromkeys(k[len("heldout_"):-len("_mean")] for r in records for k in r
                          if k.startswith("heldout_") and k.endswith("_mean"))
    epochs = [float(r["epoch"]) for r in records]
    return {name: {"epoch": epochs, "mean": [_number(r.get(f"heldout_{name}_mean")) for r in records],
                   "ci95": [_number(r.get("heldout_reward_ci95")) if name == "reward" else 0.0 for r in records]}
            for name in names}


def reward_figure(series: dict[str, Series], title: str = "", heldout: dict[str, Series] | None = None):
    """A matplotlib Figure (Agg canvas) of `reward_series`' output; each mean line has gid `<name>_mean`, the clip
    fraction line gid `clipfrac`, each diagnostic line the gid of its log key; `heldout_series`' means are drawn in
    the panel of their name, as lines with gid `heldout_<name>_mean` (the total with its interval as error bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = ("clipfrac", "dx_sq_mean", *DIAGNOSTICS)
    rewards = [name for name in series if name not in extra]
    panels = len(rewards) + 1 + ("branch_rms" in series) + ("ratio_dev" in series)
    figure = Figure(figsize=(7, 2.2 * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, rewards):
        s = series[name]
        low = [m - d for m, d in zip(s["mean"], s["std"])]
        high = [m + d for m, d in zip(s["mean"], s["std"])]
        ax.fill_between(s["epoch"], low, high, alpha=0.25, linewidth=0, label="± std", gid=f"{name}_std")
        ax.plot(s["epoch"], s["mean"], marker="o", markersize=3, label="mean", gid=f"{name}_mean")
        if name in (heldout or {}):
            h = heldout[name]
            bars = ax.errorbar(h["epoch"], h["mean"], yerr=h["ci95"], fmt="none", color="tab:orange", capsize=3)
            bars.lines[2][0].set_gid(f"heldout_{name}_ci95")
            ax.plot(h["epoch"], h["mean"], marker="s", markersize=4, color="tab:orange", label="held-out (95 % CI)",
                    gid=f"heldout_{name}_mean")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[0].set_title(f"{title}reward per epoch (mean ± std over the epoch's samples)")
    clip, ax = series["clipfrac"], axes[len(rewards)]
    ax.plot(clip["epoch"], clip["value"], marker="o", markersize=3, color="tab:red", gid="clipfrac")
    ax.set_ylabel("clipfrac")
    ax.grid(alpha=0.3)
    if "branch_rms" in series:
        _diagnostic_panels(axes[len(rewards) + 1:], series)
    axes[-1].set_xlabel("epoch")
    return figure


def _diagnostic_panels(axes, series: dict[str, Series]) -> None:
    """Branch separation (rms(delta) quartiles, mean(delta^2) on a twin axis) and |rho - 1| / eps (p50, p90, with the
    trust-region edge at 1)."""
    rms, ax = series["branch_rms"], axes[0]
    for key, style in zip(DIAGNOSTICS["branch_rms"], (":", "-", ":")):
        ax.plot(rms["epoch"], rms[key], style, marker="o", markersize=3, color="tab:green", label=key, gid=key)
    twin = ax.twinx()
    twin.plot(series["dx_sq_mean"]["epoch"], series["dx_sq_mean"]["value"], "--", color="tab:gray", label="dx_sq_mean",
              gid="dx_sq_mean")
    twin.set_ylabel("mean(δ²)")
    ax.set_ylabel("rms(δ) per pair")
    ax.legend(handles=[*ax.get_lines(), *twin.get_lines()], loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    dev, ax = series["ratio_dev"], axes[1]
    for key in DIAGNOSTICS["ratio_dev"]:
        ax.plot(dev["epoch"], dev[key], marker="o", markersize=3, label=key, gid=key)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="trust-region edge")
    ax.set_yscale("symlog", linthresh=1.0)  # linear inside the trust region, logarithmic beyond its edge
    ax.set_ylabel("|ρ − 1| / ε")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)


def write_reward_curve(log_path: str | os.PathLike, png_path: str | os.PathLike) -> dict[str, Series]:
    """Draw the reward curve of `log_path` into `png_path` (written to a temporary file, then renamed, so a reader
    never sees half a PNG). Returns the plotted series (see `reward_series`); with no epoch record yet it writes
    nothing and returns {}."""
    records = read_epoch_records(log_path)
    if not records:
        return {}
    series = reward_series(records)
    heldout = heldout_series(read_epoch_records(log_path, heldout=True))
    figure = reward_figure(series, f"{Path(log_path).parent.name}: ", heldout)
    with atomic_path(Path(png_path)) as tmp:  # a full disk: one error line, no temporary file left
        figure.savefig(tmp, format="png", dpi=100)
    return series


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one `error:` line instead of argparse's usage + message
        _fail(f"{message} (see python -m fdfo.plots --help)")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _paths(target: Path, out: Path | None) -> tuple[Path, Path]:
    """(log, png) of the command line, checked before anything is drawn; a run folder means its log.jsonl."""
    if target.is_dir():
        log_path = target / "log.jsonl"
        if not log_path.is_file():
            _fail(f"run folder {target} has no log.jsonl; pass a run folder of train.py or a log.jsonl file")
    elif target.is_file():
        log_path = target
    else:
        _fail(f"{target} not found; pass a run folder of train.py or a log.jsonl file")
    png = out if out is not None else log_path.with_name("reward_curve.png")
    if png.is_dir():
        _fail(f"output {png} is a folder; pass a file name such as {png / 'reward_curve.png'}")
    if not png.absolute().parent.is_dir():
        _fail(f"output {png}: folder {png.absolute().parent} does not exist")
    return log_path, png


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m fdfo.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (its log.jsonl is read) or a log.jsonl file")
    parser.add_argument("out", type=Path, nargs="?", default=None,
                        help="the PNG to write (default: reward_curve.png beside the log)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    log_path, out = _paths(args.run, args.out)
    if not write_reward_curve(log_path, out):
        _fail(f"{log_path} holds no epoch record yet")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
