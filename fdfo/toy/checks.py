"""The toy's input checks and strict JSON: every flag in range before any work, sizes that would not fit in memory
refused with an estimate, and results written as JSON without NaN / Infinity tokens."""

from __future__ import annotations

import json
import math
import os
import sys

FLOAT_RANGES = {  # flag -> (lowest allowed, whether the lowest itself is allowed, how to say it)
    "lr": (0.0, False, "> 0"),
    "mode_std": (0.0, False, "> 0"),
    "clip": (0.0, False, "> 0"),
    "nft_beta": (0.0, False, "> 0"),
    "churn": (0.0, True, ">= 0 (0: no churn)"),
    "kl": (0.0, True, ">= 0 (0: no KL term)"),
}
AT_LEAST = {"dim": 1, "prompts": 1, "modes": 1, "steps": 2, "evaluations": 1, "samples_per_epoch": 2, "grad_steps": 1,
            "group": 1, "hidden": 1, "eval_per_prompt": 2, "eval_every": 1, "cosine_batches": 0,
            "true_grad_samples": 1}
WHY = {"steps": " (a sampler of one step has nothing to train at intermediate noise levels)",
       "eval_per_prompt": " (the pairwise diversity compares two samples of a prompt)",
       "cosine_batches": " (0: no direction measurement)"}
TRUE_GRAD_CHUNK = 2048  # samples per backward pass of run.true_gradient
LONGEST_S = 30 * 86400  # a run estimated to take longer than this is refused after its first epoch
WARN_S = 3600  # ... and one longer than this is announced
SHRINKS = "--dim, --modes, --samples-per-epoch, --steps, --prompts x --eval-per-prompt or --hidden"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg) -> None:
    """ValueError naming the first flag of the ToyConfig `cfg` outside its range, or the memory it would need."""
    for name, low in AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"{flag(name)} must be >= {low}{WHY.get(name, '')}, got {getattr(cfg, name)}")
    for name, (low, inclusive, allowed) in FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise ValueError(f"{flag(name)} must be a finite number {allowed}, got {value}")
    if cfg.samples_per_epoch % 2:
        raise ValueError(f"--samples-per-epoch must be even (FDFO pairs), got {cfg.samples_per_epoch}")
    if cfg.algorithm in ("flow_grpo", "diffusion_nft"):
        if cfg.group < 2:
            raise ValueError(f"--group must be >= 2 for --algorithm {cfg.algorithm} (group-relative advantages), "
                             f"got {cfg.group}")
        if cfg.samples_per_epoch % cfg.group:
            raise ValueError(f"--samples-per-epoch ({cfg.samples_per_epoch}) must be a multiple of --group "
                             f"({cfg.group})")
    need, phase = memory_estimate(cfg)
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(f"these sizes need about {need / 2**30:,.1f} GiB of memory ({phase}), more than the "
                         f"{have / 2**30:,.1f} GiB available; lower {SHRINKS}")


def check_duration(cfg, first_epoch_s: float, epochs: int) -> None:
    """After the first of `epochs` epochs took `first_epoch_s` seconds: ValueError if the whole budget would take
    longer than LONGEST_S (naming --evaluations and how many fit), a line on stderr if longer than WARN_S."""
    estimate = first_epoch_s * epochs
    if estimate > LONGEST_S:
        fits = int(LONGEST_S / max(first_epoch_s, 1e-9)) * cfg.samples_per_epoch
        raise ValueError(f"--evaluations {cfg.evaluations} would take about {_duration(estimate)} on this machine "
                         f"(its first epoch of {cfg.samples_per_epoch} took {first_epoch_s:.3g} s); at most "
                         f"{LONGEST_S // 86400} days are allowed: about {fits:,} evaluations")
    if estimate > WARN_S:
        print(f"--evaluations {cfg.evaluations}: about {_duration(estimate)} on this machine (estimated from the "
              f"first epoch)", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"


def memory_estimate(cfg) -> tuple[int, str]:
    """(bytes, the largest phase) the run needs at most, an upper bound. Every velocity evaluation of a batch of B
    states builds `[B, modes, dim]` tensors for the exact mixture velocity (about 4 of them live at once with
    autograd) and `[B, hidden]` activations; training keeps a whole epoch's trajectory for the backward pass
    (backprop) or as items (the others); the evaluation also builds `[prompts, n, n]` pairwise distances; the
    reference gradient runs chunks of 2048 samples through the whole sampler with autograd."""
    row = 4 * (4 * cfg.modes * cfg.dim + 8 * cfg.hidden + 8 * cfg.dim)  # float32 bytes per (state, step)
    n, prompts = cfg.eval_per_prompt, cfg.prompts
    phases = {
        "training: --samples-per-epoch x --steps states": cfg.samples_per_epoch * cfg.steps * row,
        "evaluation: --prompts x --eval-per-prompt samples": prompts * n * (row + 4 * (n + cfg.modes)),
    }
    if cfg.cosine_batches:
        phases["reference gradient: --true-grad-samples x --steps states"] = (
            min(TRUE_GRAD_CHUNK, cfg.true_grad_samples) * cfg.steps * row)
    params = (cfg.dim + 32 + 16) * cfg.hidden + cfg.hidden**2 + cfg.hidden * cfg.dim + 16 * prompts
    fixed = 4 * (4 * params + prompts * cfg.modes * cfg.dim)  # weights, gradients, two Adam moments; the problem
    phase = max(phases, key=phases.get)
    return phases[phase] + fixed, phase


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), else the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def finite_or_none(obj):
    """`obj` with every NaN / infinite float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj) -> str:
    """Strict JSON text (no NaN / Infinity tokens, which other JSON readers refuse): non-finite numbers are null."""
    return json.dumps(finite_or_none(obj), indent=1, allow_nan=False) + "\n"
