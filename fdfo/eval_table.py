"""What metrics.py prints: the table of means and intervals (or of paired differences with --compare), a note under
it for every metric that gave some images a non-finite score, and the error when a metric scored none."""

from __future__ import annotations

from fdfo import stats
from fdfo.errors import RunError


def fmt_score(value: float | None, digits: int = 4) -> str:
    """A mean as metrics.py's table and the held-out evaluation's line print it ("nan": no finite score)."""
    return f"{value:.{digits}f}" if value is not None else "nan"


def _fmt_interval(interval: list) -> str:
    low, high = interval
    return "n/a" if low is None else f"[{fmt_score(low)}, {fmt_score(high)}]"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def nonfinite_notes(results: dict, label: str = "") -> list[str]:
    """One line per metric with NaN / infinite scores: how many of its values, and what that does to the table."""
    lines = []
    for name, s in results["stats"].items():
        bad, total = s.get("n_nonfinite", 0), s["n_images"]
        if bad:
            unit = "prompts" if total == s["n"] and results["num_repeats"] > 1 else "images"
            lines.append(f"{label}{name}: {bad} of {total} {unit} got a non-finite score (NaN or inf), so its mean "
                         f"and interval are undefined{'; it scored none of them' if bad == total else ''}")
    return lines


def format_table(results: dict) -> str:
    lines = [f"{'metric':<20} {'mean':>12} {'95% CI':>25} {'n':>7}"]
    for name, s in results["stats"].items():
        lines.append(f"{name:<20} {fmt_score(s['mean']):>12} {_fmt_interval(s['ci95']):>25} {s['n']:>7}")
    lines.append(f"({results['num_prompts']:,} prompts x {results['num_repeats']} of {results['prompt_set']}, "
                 f"{results['checkpoint']}, {results['elapsed_s']:.0f} s; CI: t-interval over prompts, n = prompts)")
    return "\n".join(lines + nonfinite_notes(results))


def format_comparison(results: dict) -> str:
    a, b = results["a"], results["b"]
    lines = [f"A: {a['checkpoint']} (guidance {a['guidance_scale']:g})",
             f"B: {b['checkpoint']} (guidance {b['guidance_scale']:g})",
             f"{'metric':<20} {'A':>10} {'B':>10} {'A - B':>10} {'95% CI of A - B':>25} {'p':>9} {'n':>7}"]
    for name, d in results["difference"].items():
        lines.append(f"{name:<20} {fmt_score(a['stats'][name]['mean']):>10} {fmt_score(b['stats'][name]['mean']):>10} "
                     f"{fmt_score(d['mean_difference']):>10} {_fmt_interval(d['ci95']):>25} {_fmt_p(d['p_value']):>9} "
                     f"{d['n']:>7}")
    lines.append(f"({a['num_prompts']:,} prompts x {a['num_repeats']} of {a['prompt_set']}, the same seeds for A and "
                 f"B; p: {stats.PAIRED_TEST})")
    return "\n".join(lines + nonfinite_notes(a, "A: ") + nonfinite_notes(b, "B: "))


def check_scored(results: dict) -> None:
    """RunError if a metric gave every one of its images (of either checkpoint) a non-finite score."""
    sides = [("", results)] if "stats" in results else [("A: ", results["a"]), ("B: ", results["b"])]
    for label, side in sides:
        dead = [name for name, s in side["stats"].items() if s.get("n_nonfinite", 0) == s["n_images"] > 0]
        if dead:
            raise RunError(f"{label}{', '.join(dead)} gave every image a non-finite score (NaN or inf), so the table "
                           f"has no number for {'it' if len(dead) == 1 else 'them'}: check that reward (its model "
                           f"files, its inputs) before trusting any run it scores.")
