"""The `--eval.*` settings of train.py: held-out evaluation during training (fdfo/heldout.py, docs/training.md,
"Held-out evaluation"), and their checks, run before anything loads. Kept apart from fdfo/heldout.py so that the
configuration imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HELDOUT_KEY = "heldout_reward_mean"  # the log key that marks a held-out record (fdfo/runlog.py, fdfo/plots.py)
PICKSCORE_TEST = "pickscore_test"  # the paper presets' held-out prompts: a named set of fdfo/prompts.py
# The smoke presets' held-out prompts ship beside their training prompts; found from any working directory.
SMOKE_HELDOUT_PROMPTS = str(Path(__file__).resolve().parents[1] / "prompt_sets" / "smoke_heldout.txt")


@dataclass
class HeldoutConfig:
    every: int = 10
    """Evaluate on held-out prompts every this many epochs, and the starting model before the first epoch (each
    evaluated epoch is saved as a checkpoint); 0 turns it off."""
    num_prompts: int = 64
    """Held-out prompts per evaluation, one image each (the first after the seeded shuffle of --eval.prompts)."""
    prompts: str = PICKSCORE_TEST
    """Held-out prompts: pickscore_test (the Pick-a-Pic test prompts, `python -m fdfo.prompts download
    pickscore_test`), another named set, or the path of a text file; prompts of --prompt-file are left out."""
    seed: int = 0
    """Seed of the prompt shuffle and of the images (image j uses seed + j), the same at every evaluation."""
    metrics: tuple[str, ...] = ()
    """Metrics of metrics.py to compute beside the run's reward terms, e.g. pickscore (needs its model)."""
    stop_after: int = 0
    """End the run once the over-optimisation warning has fired at this many evaluations in a row; 0 never stops."""


def smoke_heldout() -> HeldoutConfig:
    """The smoke presets': every 4 epochs (their checkpoints) on all 16 prompts of prompt_sets/smoke_heldout.txt."""
    return HeldoutConfig(every=4, num_prompts=16, prompts=SMOKE_HELDOUT_PROMPTS)


def heldout_problems(cfg) -> list[str]:
    """One clause per invalid --eval.* setting of the training config `cfg` (config.check_config joins them)."""
    from rewards.build import EVAL_METRICS, PRESETS, SMOKE_METRICS, metric_specs, parse_spec

    e, problems = cfg.eval, []
    if e.every < 0:
        problems.append(f"--eval.every {e.every} is invalid: it must be >= 0 (0 turns held-out evaluation off)")
    if e.num_prompts < 1:
        problems.append(f"--eval.num-prompts {e.num_prompts} is invalid: it must be >= 1")
    if not 0 <= e.seed < 2**32:  # numpy's shuffle seed (fdfo.evaluation.select_prompts)
        problems.append(f"--eval.seed {e.seed} is invalid: it must be in [0, 2**32 - 1]")
    if e.stop_after < 0:
        problems.append(f"--eval.stop-after {e.stop_after} is invalid: it must be >= 0 (0 never stops)")
    elif e.stop_after and not e.every:
        problems.append(f"--eval.stop-after {e.stop_after} is invalid with --eval.every 0: it counts evaluations")
    names = list(e.metrics)
    try:
        if names:
            metric_specs(names)
    except ValueError:
        problems.append(f"--eval.metrics {' '.join(names)} is invalid: it takes names of "
                        f"{', '.join(EVAL_METRICS + SMOKE_METRICS)}, or \"plugin:1:file.py:Attr\" / \"remote:1:URL\"")
    terms = set()
    for spec in cfg.reward.specs or PRESETS.get(cfg.reward_preset, ()):
        try:
            terms.add(parse_spec(spec).kind)
        except ValueError:
            pass  # reported by the reward's own check
    twice = sorted({n for n in names if names.count(n) > 1} | (set(names) & (terms | {"reward"})))
    if twice:
        problems.append(f"--eval.metrics {' '.join(twice)} is invalid: a metric named twice, or a term of the run's "
                        f"reward (scored anyway, as heldout_<term>_mean)")
    return problems


def check_heldout_metrics(cfg) -> None:
    """Every --eval.metrics plug-in imports and every reward server answers: before anything loads."""
    if cfg.eval.every and cfg.eval.metrics:
        from rewards.build import check_specs, metric_specs

        check_specs(metric_specs(cfg.eval.metrics), cfg.reward)
