"""The reward curve of a run, drawn from its log.jsonl: one panel per reward series (the weighted total `reward` and
each component, mean +- std over the epoch's samples) and one for the SPO clip fraction, against the epoch.

    python -m fdfo.plots runs/00001-fdfo/log.jsonl            # writes runs/00001-fdfo/reward_curve.png

Matplotlib's Agg canvas is used directly (no pyplot, no display, no global backend state).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from fdfo.files import atomic_path

Series = dict[str, list[float]]


def _number(value) -> float:
    """A logged value as a float; None, strings and other non-numbers become NaN (a gap in the line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def read_epoch_records(log_path: str | os.PathLike) -> list[dict]:
    """The epoch records of a log (those without a `step`), one per epoch, sorted by epoch.

    A resumed run may log an epoch twice (the epoch that was running when it stopped): the last record wins. A line
    that is not JSON (a crash in mid-write) is skipped.
    """
    by_epoch = {}
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" not in record and isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def reward_series(records: list[dict]) -> dict[str, Series]:
    """`{name: {"epoch", "mean", "std"}}` for `reward` first, then every component in order of first appearance, and
    `{"clipfrac": {"epoch", "value"}}`. A component missing from an epoch's record is NaN there."""
    names = []
    for record in records:
        for key in record:
            name = key[:-len("_mean")]
            if key.endswith("_mean") and name not in names:
                names.append(name)
    names.sort(key=lambda n: n != "reward")  # stable: the total first, components in log order
    epochs = [float(r["epoch"]) for r in records]
    out = {name: {"epoch": epochs, "mean": [_number(r.get(f"{name}_mean")) for r in records],
                  "std": [_number(r.get(f"{name}_std")) for r in records]} for name in names}
    out["clipfrac"] = {"epoch": epochs, "value": [_number(r.get("clipfrac")) for r in records]}
    return out


def reward_figure(series: dict[str, Series], title: str = ""):
    """A matplotlib Figure (Agg canvas) of `reward_series`' output; each mean line has gid `<name>_mean`, the clip
    fraction line gid `clipfrac`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rewards = [name for name in series if name != "clipfrac"]
    figure = Figure(figsize=(7, 2.2 * (len(rewards) + 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rewards) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, rewards):
        s = series[name]
        low = [m - d for m, d in zip(s["mean"], s["std"])]
        high = [m + d for m, d in zip(s["mean"], s["std"])]
        ax.fill_between(s["epoch"], low, high, alpha=0.25, linewidth=0, label="± std", gid=f"{name}_std")
        ax.plot(s["epoch"], s["mean"], marker="o", markersize=3, label="mean", gid=f"{name}_mean")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[0].set_title(f"{title}reward per epoch (mean ± std over the epoch's samples)")
    clip = series["clipfrac"]
    axes[-1].plot(clip["epoch"], clip["value"], marker="o", markersize=3, color="tab:red", gid="clipfrac")
    axes[-1].set_ylabel("clipfrac")
    axes[-1].set_xlabel("epoch")
    axes[-1].grid(alpha=0.3)
    return figure


def write_reward_curve(log_path: str | os.PathLike, png_path: str | os.PathLike) -> dict[str, Series]:
    """Draw the reward curve of `log_path` into `png_path` (written to a temporary file, then renamed, so a reader
    never sees half a PNG). Returns the plotted series (see `reward_series`); with no epoch record yet it writes
    nothing and returns {}."""
    records = read_epoch_records(log_path)
    if not records:
        return {}
    series = reward_series(records)
    figure = reward_figure(series, f"{Path(log_path).parent.name}: ")
    with atomic_path(Path(png_path)) as tmp:  # a full disk: one error line, no temporary file left
        figure.savefig(tmp, format="png", dpi=100)
    return series


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    if len(args) not in (1, 2):
        fail("usage: python -m fdfo.plots LOG.jsonl [OUT.png]  (default: reward_curve.png beside the log)")
    log_path = Path(args[0])
    if not log_path.is_file():
        fail(f"log file {log_path} not found")
    out = Path(args[1]) if len(args) == 2 else log_path.with_name("reward_curve.png")
    if not write_reward_curve(log_path, out):
        fail(f"{log_path} holds no epoch record yet")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
