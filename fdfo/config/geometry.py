"""The batch geometry of docs/algorithm.md §5: pairs per GPU, sampling and training batches, gradient accumulation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fdfo.config.settings import Config


@dataclass(frozen=True)
class Geometry:
    world_size: int
    pairs_per_gpu: int
    sample_batch: int
    train_batch: int
    grad_accum: int
    items_per_step: int
    """Training items per optimizer step per rank and per timestep: 2 * pairs_per_gpu / gradient_steps."""
    gradient_steps: int
    pair_multiple: int = 1
    """Pairs (prompts) per GPU must be a multiple of this for the items to split into the optimizer steps."""

    @property
    def total_pairs(self) -> int:
        return self.pairs_per_gpu * self.world_size

    def describe(self, requested_pairs: int, num_steps: int, group: int | None = None) -> str:
        """The arithmetic, printed at start; group: G of a group method (--algorithm flow_grpo / diffusion_nft),
        None for FDFO's pairs. A request that does not split over the GPUs gets a second line saying what is
        trained instead."""
        unit = "pairs" if group is None else f"prompts x {group}"
        per_epoch = f"{self.total_pairs} {unit} per epoch"
        if group is not None:
            per_epoch += f" = {self.total_pairs * group} samples"
        line = (
            f"batch geometry: {requested_pairs} {unit} requested / {self.world_size} GPU(s) -> "
            f"{self.pairs_per_gpu} {unit} per GPU ({per_epoch}); sample batch {self.sample_batch} {unit}; "
            f"{self.gradient_steps} optimizer steps per epoch, each over {self.items_per_step} "
            f"{'items' if group is None else 'samples'} x {num_steps} timesteps per GPU = "
            f"{num_steps * self.grad_accum} micro-batches of {self.train_batch}"
        )
        if self.total_pairs != requested_pairs:
            step = self.world_size * self.pair_multiple
            lower, upper = requested_pairs // step * step, (requested_pairs // step + 1) * step
            line += (f"\nbatch geometry: ROUNDED: --total-pairs-per-epoch {requested_pairs} does not split over "
                     f"{self.world_size} GPU(s) in multiples of {self.pair_multiple}; training {self.total_pairs} "
                     f"({requested_pairs - self.total_pairs} fewer). Pass {lower if lower else upper} or {upper} to "
                     f"choose.")
        return line


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def batch_geometry(cfg: Config, world_size: int) -> Geometry:
    """Resolve pairs per GPU and the sampling / training batch sizes; raise ValueError for impossible requests."""
    total, steps, group = cfg.total_pairs_per_epoch, cfg.gradient_steps_per_epoch, cfg.samples_per_prompt
    if steps < 1:
        raise ValueError(f"--gradient-steps-per-epoch must be >= 1, got {steps}")
    # G * pairs_per_gpu items (G = 2: a pair) must split evenly into `steps` optimizer steps.
    multiple = steps // math.gcd(group, steps)
    pairs_per_gpu = total // world_size // multiple * multiple
    if pairs_per_gpu < 1:
        need = world_size * multiple
        raise ValueError(
            f"--total-pairs-per-epoch {total} is too small for {world_size} GPU(s) and {steps} gradient steps: each "
            f"GPU needs a multiple of {multiple} pairs. Use --total-pairs-per-epoch >= {need} or fewer "
            f"--gradient-steps-per-epoch."
        )
    max_batch = cfg.max_batch_size if cfg.max_batch_size is not None else (13 if world_size >= 8 else 6)
    if max_batch < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch}")
    items_per_step = group * pairs_per_gpu // steps
    # a sampling batch of b prompts holds b * G images: at most about as many as max_batch pairs (FDFO: unchanged)
    sample_batch = _checked_batch(cfg.sample.batch_size, pairs_per_gpu, max(1, 2 * max_batch // group),
                                  "--sample.batch-size", "pairs per GPU")
    train_batch = _checked_batch(cfg.train.batch_size, items_per_step, max_batch, "--train.batch-size",
                                 f"items per step ({group} * pairs per GPU / gradient steps)")
    return Geometry(world_size, pairs_per_gpu, sample_batch, train_batch, items_per_step // train_batch,
                    items_per_step, steps, multiple)


def _checked_batch(requested: int | None, n: int, max_batch: int, flag: str, what: str) -> int:
    if requested is None:
        return _largest_divisor(n, max_batch)
    if requested < 1 or n % requested:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"{flag} {requested} must divide the {n} {what}; valid values: {divisors}")
    return requested
