"""Paired trajectories with churn (ALGORITHM.md §1–§2), and the plain Euler sampler used for evaluation.

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


# ALGORITHM.md §2, prior churn: x <- x/(1+g) + n*sqrt((1+g)^2-1)/(1+g), which keeps unit variance.
def prior_churn(x: torch.Tensor, gamma: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Churn the initial latent. x, noise: `[B, ...]`; gamma: float or `[B]`. Returns float32 `[B, ...]`."""
    g = _per_sample(gamma, x)
    x, noise = x.float(), noise.float()
    return (x + noise * torch.sqrt((1 + g) ** 2 - 1)) / (1 + g)


# ALGORITHM.md §2, churned step t -> s: overshoot to r = s/(1+g(1-s)), Euler to r, re-noise back up to level s.
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
# Churn schedules (ALGORITHM.md §2): each maps the sigma grid and per-sample random draws to per-sample gammas.


class ChurnSchedule(Protocol):
    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigmas: `[T+1]` from 1 down to 0; z: `[B]` standard-normal draws (one per sample, used by random
        schedules). Returns (prior gamma `[B]`, per-step gamma `[B, T]`)."""
        ...


@dataclass(frozen=True)
class RawChurn:
    """The default: gamma = exp(weight) - 1 before the first step and at every step but the last (which lands on 0)."""

    weight: float = 0.0025

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = math.expm1(self.weight)
        steps = torch.full((len(z), len(sigmas) - 1), gamma, dtype=torch.float32, device=z.device)
        steps[:, -1] = 0.0
        return torch.full((len(z),), gamma, dtype=torch.float32, device=z.device), steps


@dataclass(frozen=True)
class PriorChurn:
    """Experimental: churn only at sigma = 1 (prior churn with gamma = exp(weight) - 1, plain Euler steps after)."""

    weight: float = 0.0025

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prior = torch.full((len(z),), math.expm1(self.weight), dtype=torch.float32, device=z.device)
        return prior, torch.zeros(len(z), len(sigmas) - 1, dtype=torch.float32, device=z.device)


@dataclass(frozen=True)
class IntervalChurn:
    """Experimental: churn concentrated around one random time per sample.

    The centre is logit-normal, sigma_c = sigmoid(z). Step k gets a log-churn proportional to a Gaussian bump of
    width `width` in logit(sigma) around logit(sigma_c); the bumps are normalised so that the total log-churn
    sum_k log(1 + gamma_k) equals what the raw schedule spends over the same steps (weight * (T - 1)). No prior churn.
    """

    weight: float = 0.0025
    width: float = 0.5

    def __call__(self, sigmas: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = sigmas[:-1].float().to(z.device).clamp(1e-4, 1 - 1e-4)  # [T], the level each step starts from
        bump = torch.exp(-0.5 * ((torch.logit(t)[None, :] - z.float()[:, None]) / self.width) ** 2)  # [B, T]
        bump[:, -1] = 0.0  # the step that lands on sigma = 0 never churns
        bump = bump / bump.sum(dim=1, keepdim=True).clamp_min(1e-12)
        steps = torch.expm1(self.weight * (len(t) - 1) * bump)
        return torch.zeros(len(z), dtype=torch.float32, device=z.device), steps


def make_churn(schedule: str, weight: float) -> ChurnSchedule:
    """Build a churn schedule by name ('raw', 'interval', 'prior')."""
    table = {"raw": RawChurn, "interval": IntervalChurn, "prior": PriorChurn}
    if schedule not in table:
        raise ValueError(f"unknown churn schedule {schedule!r}; choose one of {sorted(table)}")
    if weight < 0:
        raise ValueError(f"churn weight must be >= 0, got {weight}")
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
    z:        `[B]` standard-normal draws for random churn schedules.
    """
    x = x1.float().repeat_interleave(2, dim=0)
    num_steps = len(sigmas) - 1
    prior_gamma, step_gamma = churn(sigmas, z)
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


# ALGORITHM.md §1: plain Euler steps x_s = x_t + (s - t) v from sigma = 1 to 0, no churn (evaluation and generation).
@torch.no_grad()
def sample_euler(velocity: VelocityFn, x: torch.Tensor, cond: object, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic sampling. x: `[B, ...]` initial latents at sigmas[0]; sigmas: `[T+1]` decreasing to 0;
    velocity: `v(x [B, ...], sigma [B], cond) -> [B, ...]`. Returns the float32 `[B, ...]` latent at sigmas[-1]."""
    x = x.float()
    for k in range(len(sigmas) - 1):
        v = velocity(x, sigmas[k].expand(len(x)), cond).float()
        x = x + (sigmas[k + 1] - sigmas[k]).float() * v
    return x
