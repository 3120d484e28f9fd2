"""Held-out evaluation during training (docs/training.md, "Held-out evaluation"): the reward on prompts the run never
trains on, the best checkpoint (best.json) and a warning when the training reward rises while the held-out reward
falls.

Evaluation E scores the policy after E epochs, the one that samples epoch E's rollouts, so on the reward curve it
sits beside the training record of epoch E. Evaluated: E = 0 (the starting model) and every `--eval.every` epochs;
every evaluated epoch > 0 is also saved as a checkpoint. The policy is what generate.py / metrics.py
load for that checkpoint (the trained LoRA; a baseline's EMA), sampled as they sample it (fdfo/generation.py: the
pipeline itself, one generator per image, no churn), on the prompts and seeds of metrics.py's protocol
(fdfo/evaluation.py: the seeded shuffle, image j from seed `--eval.seed + j`, 8-bit images, prompts dealt over the
ranks and gathered), and scored by the run's own reward terms (plus `--eval.metrics`). The record of epoch E is
therefore `metrics.py --checkpoint RUN/checkpoints/epoch-E --prompt-set P --num-prompts N --seed S` with the run's
terms as metrics (exactly so for terms whose metric is the training scorer, e.g. the analytic ones).

Everything kept across a restart lives in log.jsonl: one record per evaluated epoch (a resumed run keeps the record
of the epoch it resumes from and repeats no evaluation; fdfo/runlog.py), from which best.json, the warning and
--eval.stop-after are recomputed.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.checkpoints import BEST_FILE, checkpoint_dir
from fdfo.eval_table import fmt_score
from fdfo.files import write_json_atomic
from fdfo.heldout_config import HELDOUT_KEY, PICKSCORE_TEST
from fdfo.runlog import LOG_FILE, read_records

GRID_PROMPTS = 4  # images of the first prompts drawn (and sent to wandb) at every evaluation


def heldout_due(cfg, epoch: int) -> bool:
    """Whether the policy after `epoch` epochs is evaluated: at 0 and every --eval.every epochs (a function of the
    epoch alone, so a run split by resumes evaluates the epochs of an uninterrupted one)."""
    return cfg.eval.every > 0 and epoch % cfg.eval.every == 0


def heldout_plan(cfg, training_prompts: list[str]):
    """The evaluated prompts (fdfo.evaluation.Plan, one image each): --eval.prompts without any prompt of the
    training file, shuffled by --eval.seed, the first --eval.num-prompts kept. Raises before any model loads."""
    from fdfo.evaluation import Plan, select_prompts
    from fdfo.prompts import load_prompt_set

    e = cfg.eval
    try:
        prompts = load_prompt_set(e.prompts, option="--eval.prompts")
    except FileNotFoundError as err:
        fix = f" (the default of --preset {cfg.preset})" if e.prompts == PICKSCORE_TEST else ""
        raise FileNotFoundError(f"held-out prompts --eval.prompts {e.prompts}{fix}: {err} Or turn held-out "
                                f"evaluation off with --eval.every 0.") from None
    trained = set(training_prompts)
    kept = [i for i, prompt in enumerate(prompts) if prompt not in trained]
    if len(kept) < len(prompts):
        dist.warn0(f"--eval.prompts {e.prompts}: {len(prompts) - len(kept)} of its {len(prompts):,} prompts are also "
                   f"in --prompt-file {cfg.prompt_file}; they are left out of the held-out prompts")
    if e.num_prompts > len(kept):
        raise ValueError(f"--eval.num-prompts {e.num_prompts} is more than the {len(kept):,} held-out prompts of "
                         f"--eval.prompts {e.prompts} (not in the training file); pass at most {len(kept):,}")
    chosen = [kept[i] for i in select_prompts(len(kept), e.num_prompts, e.seed)]
    return Plan([prompts[i] for i in chosen], chosen, 1, e.seed)


class PolicyPipeline:
    """The training policy's pipeline as fdfo.generation.ImageSampler's base model: its transformer carries the
    trained LoRA, active, so `activate` has nothing to switch. Called under the training's autocast, if any: the
    speed levers hold the frozen weights in the autocast dtype (fdfo/models/sd3_speed.py), so the transformer runs only
    under it; without autocast (fp32 on a CPU) the call is the pipeline's own."""

    def __init__(self, policy, pretrained_model: str):
        self.policy, self.device, self.pretrained_model = policy, policy.device, pretrained_model

    def pipe(self, **kwargs):
        with self.policy.autocast():
            return self.policy.pipe(**kwargs)

    def activate(self, adapter) -> None:
        pass


class HeldoutScorer:
    """The run's reward ("reward" and each term) and the --eval.metrics, as fdfo.evaluation.generate_and_score's
    scorer: `components(prompts, images)` -> {name: [B] on CPU} for every name of `names`."""

    def __init__(self, reward, metrics, device: torch.device):
        self.reward, self.metrics, self.device = reward, metrics, device
        terms = getattr(reward, "names", ())  # a WeightedReward's; a reward that names no terms: only the total
        self.names = ("reward", *terms, *(metrics.names if metrics is not None else ()))
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:  # a plug-in or a reward server that names a score like another one (built-in names: config check)
            raise ValueError(f"--eval.metrics {' '.join(metrics.names)}: the score name(s) {', '.join(twice)} are "
                             f"also the run's reward's; pass other metrics")

    def components(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.to(self.device)  # the 8-bit images / 255, as the training scorers see images: on the device
        parts = self.reward.components(prompts, images)
        if self.metrics is not None:
            parts |= {k: v for k, v in self.metrics.components(prompts, images).items() if k != "reward"}
        return {name: parts[name].float().cpu() for name in self.names}


class KeepFirst:
    """An image sampler that also keeps (8 bits) the images of prompts j < n, for the grid."""

    def __init__(self, sampler, image_seed: int, n: int):
        self.sampler, self.image_seed, self.n, self.kept = sampler, image_seed, n, {}
        self.resolution = sampler.resolution

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        from fdfo.images import to_uint8

        images = self.sampler.generate(prompts, seeds)
        for image, seed in zip(images, seeds):
            if seed - self.image_seed < self.n:
                self.kept[seed - self.image_seed] = to_uint8(image)
        return images


class Heldout:
    """A run's held-out evaluation: the plan, the sampler and scorer, and the records so far (on every rank)."""

    def __init__(self, cfg, geom, plan, policy, reward, metrics, run_dir: Path, logger):
        from fdfo.generation import ImageSampler, sampling_defaults
        from fdfo.hub import Checkpoint

        self.cfg, self.plan, self.run_dir, self.logger = cfg, plan, Path(run_dir), logger
        s = cfg.sample
        run = Checkpoint(None, "the run's policy", "held-out", s.guidance_scale, "training run",
                         cfg.pretrained_model, s.resolution, s.num_solver_steps)
        steps, resolution, _ = sampling_defaults([run], cfg.pretrained_model)  # what metrics.py samples it with
        self.sampler = ImageSampler(PolicyPipeline(policy, cfg.pretrained_model), run, None, s.guidance_scale, steps,
                                    resolution, "the run's")
        self.scorer = HeldoutScorer(reward, metrics, policy.device)
        images = geom.sample_batch * cfg.samples_per_prompt  # the sampling phase's images per forward
        # Images per pipeline call: the sampling phase's per forward. The pipeline decodes a call's images at once, as
        # metrics.py does (so the records equal metrics.py's), whatever --sample.decode-batch-size says for training
        # rollouts: about 0.95 GB per 512 px image at the decode's peak (docs/training.md, "Held-out evaluation").
        self.batch_size = images
        self.records = dist.broadcast_object(self._read_records() if dist.get_rank() == 0 else None)
        if dist.get_rank() == 0:
            update_best(self.run_dir, self.records)
        dist.print0(f"held-out evaluation: {len(plan.prompts)} prompts of {cfg.eval.prompts} (seed {cfg.eval.seed}), "
                    f"every {cfg.eval.every} epochs, {steps} steps at {resolution} px, guidance "
                    f"{s.guidance_scale:g}; scores: {', '.join(self.scorer.names)}")

    def _read_records(self) -> list[dict]:
        by_epoch = {r["epoch"]: r for r in read_records(self.run_dir / LOG_FILE)
                    if HELDOUT_KEY in r and isinstance(r.get("epoch"), int)}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def step(self, epoch: int, policy, copies) -> bool:
        """Evaluate the policy after `epoch` epochs if it is due and not in the log yet; True when --eval.stop-after
        ends the run here."""
        if not heldout_due(self.cfg, epoch):
            return False
        if not any(r["epoch"] == epoch for r in self.records):
            self.evaluate(epoch, policy, copies)
        k = self.cfg.eval.stop_after
        if k and warnings_in_a_row(self.records) >= k:
            dist.print0(f"stopping after epoch {epoch}: the over-optimisation warning fired at the last {k} "
                        f"evaluation(s) (--eval.stop-after {k}); best.json names the best checkpoint")
            return True
        return False

    def evaluate(self, epoch: int, policy, copies) -> dict:
        """Generate, score and gather; rank 0 logs the record (with the warning, if any), the grid and best.json."""
        from fdfo.evaluation import gather_prompts, generate_and_score

        start = time.perf_counter()
        policy.offload_text_encoders(False)
        policy.transformer.eval()
        n = min(GRID_PROMPTS, len(self.plan.prompts))
        keep = KeepFirst(self.sampler, self.plan.image_seed, n)
        devices = [policy.device] if policy.device.type == "cuda" else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.random.fork_rng(devices=devices))  # the training's random streams: untouched
            if copies is not None:
                stack.enter_context(copies.swapped(copies.ema))  # a baseline is evaluated with its EMA, as saved
            scores, _ = generate_and_score(self.plan, keep, self.scorer, None, self.batch_size, None)
        scores = gather_prompts(scores, len(self.plan.prompts), policy.device)
        grid = gather_grid(keep, n, policy.device)
        record = None
        if dist.get_rank() == 0:
            record = heldout_record(epoch, self.scorer.names, scores, time.perf_counter() - start)
            warning = overoptimisation([*self.records, record], read_records(self.run_dir / LOG_FILE))
            if warning is not None:
                record["heldout_warning"] = warning
                dist.warn0(warning)
            self.logger.log(record)
            self.logger.log_heldout(epoch, grid_picture(grid, self.plan.prompts[:n], epoch, self.plan.image_seed))
            self.logger.draw_curve()
            update_best(self.run_dir, [*self.records, record])
        record = dist.broadcast_object(record)
        self.records.append(record)
        ci = record["heldout_reward_ci95"]
        dist.print0(f"held-out epoch {epoch}: reward {fmt_score(record[HELDOUT_KEY])}"
                    f"{f' +- {ci:.4f}' if ci is not None else ''} ({len(self.plan.prompts)} prompts, "
                    f"{record['time_heldout']:.1f}s)")
        return record


def gather_grid(keep: KeepFirst, n: int, device: torch.device) -> torch.Tensor:
    """The kept images of prompts 0 .. n-1 from every rank: `[n, 3, S, S]` uint8 on CPU."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [keep.kept[j] for j in dist.round_robin(n, rank, world)]
    side = keep.resolution
    local = torch.zeros(math.ceil(n / world), 3, side, side, dtype=torch.uint8)
    if mine:
        local[:len(mine)] = torch.stack(mine)
    return dist.unshard(dist.all_gather_cat(local.to(device)).cpu(), n, world)


def grid_picture(images: torch.Tensor, prompts: list[str], epoch: int, image_seed: int):
    """The first prompts' images side by side under their prompts (fdfo.grid's layout), each enlarged by a whole factor
    to at least PAIR_MIN_SIZE px as the rollout pairs are: a PIL image."""
    from fdfo.grid import GridLayout, draw_grid
    from fdfo.runlog import PAIR_MIN_SIZE

    scale = max(1, math.ceil(PAIR_MIN_SIZE / images.shape[-1]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # nearest pixel
    layout = GridLayout(len(prompts), 1, 1, 1, images.shape[-1])
    caption = f"held-out, epoch {epoch}: seeds {image_seed}..{image_seed + len(prompts) - 1}"
    return draw_grid(images[:, None], layout, list(prompts), [caption])


def heldout_record(epoch: int, names: tuple[str, ...], scores: torch.Tensor, elapsed: float) -> dict:
    """The log record of one evaluation from the gathered `[N, 1, M]` scores: per name the mean, and for the total the
    half-width of its 95 % t-interval over prompts (fdfo/stats.py, as metrics.py reports it)."""
    from fdfo import stats

    record = {"epoch": epoch}
    for m, name in enumerate(names):
        summary = stats.summary(scores[:, :, m].double().numpy())
        record[f"heldout_{name}_mean"] = summary["mean"]
        if name == "reward":
            low, high = summary["ci95"]
            record["heldout_reward_ci95"] = None if low is None else (high - low) / 2
    return record | {"heldout_num_prompts": scores.shape[0], "time_heldout": round(elapsed, 3)}


# ----------------------------------------------------------------------------------------------------------------------
# Decisions from the log: pure functions of the records, so a restarted run takes the same ones.


def training_reward(records: list[dict], first: int, last: int) -> float | None:
    """Mean of the training reward (`reward_mean` of the epoch records) over epochs first .. last - 1."""
    values = [r["reward_mean"] for r in records if "step" not in r and isinstance(r.get("epoch"), int)
              and first <= r["epoch"] < last and isinstance(r.get("reward_mean"), (int, float))]
    return sum(values) / len(values) if values else None


def overoptimisation(heldout: list[dict], records: list[dict]) -> str | None:
    """The warning at the last of the held-out records `heldout` (sorted by epoch), or None.

    It fires when the held-out reward fell at the last two evaluations in a row, each time by more than the larger
    95 % half-width of the two, while the training reward (mean over the epochs between two evaluations, from the
    log's `records`) rose from the span before the middle evaluation to the span after it."""
    if len(heldout) < 3:
        return None
    a, b, c = heldout[-3:]
    means = [r.get(HELDOUT_KEY) for r in (a, b, c)]
    widths = [r.get("heldout_reward_ci95") for r in (a, b, c)]
    if any(not isinstance(v, (int, float)) for v in means + widths):
        return None
    fell = all(means[i] - means[i + 1] > max(widths[i], widths[i + 1]) for i in (0, 1))
    before = training_reward(records, a["epoch"], b["epoch"])
    after = training_reward(records, b["epoch"], c["epoch"])
    if not fell or before is None or after is None or after <= before:
        return None
    return (f"over-optimisation? the held-out reward fell by more than its 95 % interval at two evaluations in a row "
            f"({means[0]:.4g} at epoch {a['epoch']} -> {means[1]:.4g} at {b['epoch']} -> {means[2]:.4g} at "
            f"{c['epoch']}, +- {widths[2]:.2g}) while the training reward rose ({before:.4g} in epochs "
            f"{a['epoch']}-{b['epoch'] - 1} -> {after:.4g} in epochs {b['epoch']}-{c['epoch'] - 1}); see best.json")


def warnings_in_a_row(heldout: list[dict]) -> int:
    """How many of the last held-out records carry the over-optimisation warning, counted back to one without."""
    count = 0
    for record in reversed(heldout):
        if "heldout_warning" not in record:
            break
        count += 1
    return count


def best_record(run_dir: Path, heldout: list[dict]) -> dict | None:
    """The evaluated checkpoint with the highest held-out reward (the earliest of equals): a record of an epoch > 0
    with a finite mean whose checkpoint is in the run folder; None if there is none (the starting model has no
    checkpoint: `generate.py --checkpoint base` is it)."""
    candidates = [r for r in heldout if r["epoch"] > 0 and isinstance(r.get(HELDOUT_KEY), (int, float))
                  and checkpoint_dir(run_dir, r["epoch"]).is_dir()]
    return max(candidates, key=lambda r: r[HELDOUT_KEY], default=None)  # max keeps the first of equals


def update_best(run_dir: Path, heldout: list[dict]) -> None:
    """Write best.json (atomically) for the records `heldout`, only when it changes; remove a stale one."""
    import json

    path = Path(run_dir) / BEST_FILE
    best = best_record(run_dir, heldout)
    if best is None:
        path.unlink(missing_ok=True)
        return
    folder = checkpoint_dir(run_dir, best["epoch"])
    content = {"epoch": best["epoch"], "checkpoint": str(folder.relative_to(run_dir)),
               "heldout_reward_mean": best[HELDOUT_KEY]}
    try:
        if json.loads(path.read_text()) == content:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, content)

