"""Paired trajectories with churn (docs/algorithm.md §1–§2), and the plain Euler sampler used for evaluation.

Everything here is model-agnostic: the sampler sees a velocity function `v(x, sigma, cond)` and a noise source,
so the same code drives SD3.5, the tiny offline pipeline and toy fields in the tests.

Batch order of every per-sample tensor is the interleaved pair order a0, b0, a1, b1, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


def _per_sample(gamma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or a per-sample `[B]` gamma against `x` of shape `[B, ...]` (float32)."""
    gamma = torch.as_tensor(gamma, dtype=torch.float32, device=x.device)
    if gamma.ndim == 0:
        return gamma
    return gamma.reshape(-1, *([1] * (x.ndim - 1)))


# docs/algorithm.md §2, prior churn: x <- x/(1+g) + n*sqrt((1+g)^2-1)/(1+g), which keeps unit variance.
def prior_churn(x: torch.Tensor, gamma: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Churn the initial latent. x, noise: `[B, ...]`; gamma: float or `[B]`. Returns float32 `[B, ...]`."""
    g = _per_sample(gamma, x)
    x, noise = x.float(), noise.float()
    return (x + noise * torch.sqrt((1 + g) ** 2 - 1)) / (1 + g)


# docs/algorithm.md §2, churned step t -> s: overshoot to r = s/(1+g(1-s)), Euler to r, re-noise back up to level s.
def churn_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    gamma: float | torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One churned Euler step. x, v, noise: `[B, ...]`; sigma, sigma_next, gamma: float or `[B]`.

    With gamma = 0 this is exactly the Euler step `x + (s - t) v`. Computed in float32.
    """
    g = _per_sample(gamma, x)
    t = _per_sample(sigma, x)
    s = _per_sample(sigma_next, x)
    x, v, noise = x.float(), v.float(), noise.float()
    r = s / (1 + g * (1 - s))
    x_r = x + (r - t) * v
    return (x_r + noise * r * torch.sqrt((1 + g) ** 2 - 1)) / (1 + g * r)


# ----------------------------------------------------------------------------------------------------------------------
# Churn schedules (docs/algorithm.md §2). A schedule gives, per pair, one value c_j per grid level sigma_0 = 1 > ... >
# sigma_{T-1} (the sigmas without the final 0); `gammas_from_levels` turns them into the sampler's gammas.

CHURN_DRAWS = 2
"""Standard-normal draws per pair that every schedule receives (the most any schedule uses: interval's mu and w)."""


class ChurnSchedule(Protocol):
    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigmas: `[T+1]` from 1 down to 0; z: `[P, CHURN_DRAWS]` standard-normal draws, one row per PAIR (both
        branches share the schedule). Returns (prior gamma `[P]`, per-step gamma `[P, T]`)."""
        ...


def gammas_from_levels(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level values c `[P, T]` -> (prior gamma c_0 `[P]`, step gammas `[P, T]`): step k (sigma_k -> sigma_k+1)
    uses c_{k+1} for k < T - 1, and the last step, which lands on sigma = 0, uses 0."""
    levels = levels.float()
    steps = torch.cat([levels[:, 1:], torch.zeros_like(levels[:, :1])], dim=1)
    return levels[:, 0].clone(), steps


@dataclass(frozen=True)
class RawChurn:
    """The default: c_j = w at every level, gamma exactly w (no exponential): prior churn and every step but the
    last get gamma = w."""

    weight: float = 0.0025

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.full((len(z), len(sigmas) - 1), float(self.weight), dtype=torch.float32, device=z.device)
        return gammas_from_levels(levels)


@dataclass(frozen=True)
class PriorChurn:
    """Experimental: churn only before the first step. Per pair w = exp(log weight + log_std * z0) (weight 0.1,
    log_std 1.0 by default) and c_0 = exp(w) - 1; every other level 0, so all steps are plain Euler steps."""

    weight: float = 0.1
    log_std: float = 1.0

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = z.new_zeros(len(z), dtype=torch.float32)
        if self.weight > 0:
            w = torch.exp(math.log(self.weight) + self.log_std * z[:, 0].float())
        levels = torch.zeros(len(z), len(sigmas) - 1, dtype=torch.float32, device=z.device)
        levels[:, 0] = torch.expm1(w)
        return gammas_from_levels(levels)


@dataclass(frozen=True)
class IntervalChurn:
    """Experimental: churn concentrated around a random noise level per pair.

    Per pair mu = mean + std * z0 (N(1.0, 1.5^2)) and w = exp(log weight + log_std * z1) (weight w0 = 1.0, log_std 0).
    Over the T levels, p_j is the logit-normal density of width `width` (0.25) centred at mu, 0 at sigma in {0, 1} or
    where not finite, normalised to sum 1 (uniform 1/T if the sum is <= 1e-6); c_j = exp(w * p_j) - 1. sigma_0 = 1
    gets p = 0, so there is no prior churn.
    """

    weight: float = 1.0
    log_std: float = 0.0
    mean: float = 1.0
    std: float = 1.5
    width: float = 0.25

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = sigmas[:-1].double().to(z.device)  # [T]
        mu = self.mean + self.std * z[:, 0].double()  # [P]
        w = (torch.exp(math.log(self.weight) + self.log_std * z[:, 1].double()) if self.weight > 0
             else z.new_zeros(len(z), dtype=torch.float64))
        density = torch.exp(-((torch.logit(levels)[None, :] - mu[:, None]) ** 2) / (2 * self.width**2)) / (
            math.sqrt(2 * math.pi) * self.width * levels * (1 - levels))  # [P, T]
        edge = (levels == 0) | (levels == 1)
        density = torch.where(edge[None, :] | ~torch.isfinite(density), 0.0, density)
        total = density.sum(dim=1, keepdim=True)
        p = torch.where(total > 1e-6, density / total.clamp_min(1e-300), 1.0 / len(levels))
        return gammas_from_levels(torch.expm1(w[:, None] * p).float())


CHURN_DEFAULT_WEIGHTS = {"raw": 0.0025, "interval": 1.0, "prior": 0.1}
"""What --sample.churn-weight means per schedule when not given: raw's gamma w, interval's w0, prior's median w."""


def make_churn(schedule: str, weight: float | None = None) -> ChurnSchedule:
    """Build a churn schedule by name ('raw', 'interval', 'prior'); weight None: the schedule's default."""
    table = {"raw": RawChurn, "interval": IntervalChurn, "prior": PriorChurn}
    if schedule not in table:
        raise ValueError(f"--sample.churn-schedule {schedule!r} is unknown; choose one of {sorted(table)}")
    if weight is None:
        weight = CHURN_DEFAULT_WEIGHTS[schedule]
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--sample.churn-weight must be a finite number >= 0, got {weight}")
    return table[schedule](weight=weight)


# ----------------------------------------------------------------------------------------------------------------------
# The paired sampler.


@dataclass
class Trajectories:
    """What sampling keeps, per sample in interleaved order a0, b0, a1, b1, ... (B = 2 * pairs).

    states:     `[B, T, ...]` the latent at which the velocity of step k was evaluated (before the step)
    velocities: `[B, T, ...]` the velocities v_ref used by the sampler (after CFG)
    sigmas:     `[T]` the noise level of each evaluation (the timestep is 1000 * sigma)
    final:      `[B, ...]` the latent at sigma = 0
    """

    states: torch.Tensor
    velocities: torch.Tensor
    sigmas: torch.Tensor
    final: torch.Tensor


@torch.no_grad()
def sample_pairs(
    velocity: VelocityFn,
    x1: torch.Tensor,
    cond: object,
    sigmas: torch.Tensor,
    churn: ChurnSchedule,
    noise: NoiseFn,
    z: torch.Tensor,
) -> Trajectories:
    """Run two churned trajectories (branches a and b) from each initial latent.

    velocity: `v(x [B, ...], sigma [B], cond) -> [B, ...]`, called with the interleaved batch; `cond` is passed
              through untouched and must already be in interleaved order (B rows).
    x1:       `[P, ...]` one initial latent per pair.
    sigmas:   `[T+1]` decreasing from 1 to 0.
    noise:    `noise(k)` returns fresh `[B, ...]` noise for the prior churn (k = -1) and for step k = 0..T-1.
    z:        `[P, CHURN_DRAWS]` standard-normal draws per pair for random churn schedules; both branches of a pair
              share the resulting gammas.
    """
    x = x1.float().repeat_interleave(2, dim=0)
    num_steps = len(sigmas) - 1
    prior_gamma, step_gamma = (g.repeat_interleave(2, dim=0) for g in churn(sigmas, z))
    x = prior_churn(x, prior_gamma, noise(-1))
    states, velocities = [], []
    for k in range(num_steps):
        sigma = sigmas[k].expand(len(x))
        v = velocity(x, sigma, cond).float()
        states.append(x)
        velocities.append(v)
        x = churn_step(x, v, sigmas[k], sigmas[k + 1], step_gamma[:, k], noise(k))
    return Trajectories(
        states=torch.stack(states, dim=1),
        velocities=torch.stack(velocities, dim=1),
        sigmas=sigmas[:-1].float().clone(),
        final=x,
    )


# docs/algorithm.md §1: plain Euler steps x_s = x_t + (s - t) v from sigma = 1 to 0, no churn (evaluation, generation).
@torch.no_grad()
def sample_euler(velocity: VelocityFn, x: torch.Tensor, cond: object, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic sampling. x: `[B, ...]` initial latents at sigmas[0]; sigmas: `[T+1]` decreasing to 0;
    velocity: `v(x [B, ...], sigma [B], cond) -> [B, ...]`. Returns the float32 `[B, ...]` latent at sigmas[-1]."""
    x = x.float()
    for k in range(len(sigmas) - 1):
        v = velocity(x, sigmas[k].expand(len(x)), cond).float()
        x = x + (sigmas[k + 1] - sigmas[k]).float() * v
    return x
