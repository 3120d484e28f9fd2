"""DPM-Solver++(2M) in data prediction (Lu et al. 2022, "DPM-Solver++", multistep second order) written in the
flow parametrisation of docs/algorithm.md §1: x(sigma) = alpha x0 + sigma e with alpha = 1 - sigma, so the data
predicted from a velocity is x0_hat = x - sigma v, and lambda = log(alpha / sigma) (the half log-SNR).

DiffusionNFT's rollouts (docs/algorithm.md §11) use it as its authors' `dpm2`: first order at the first step and the
last, second order between. The second-order step right after sigma = 1 has lambda_prev = -inf, so its correction
vanishes (r = inf): in effect the first two steps are first order. Pure tensor functions; the model is a velocity
function, so a test drives them with an analytic flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def half_log_snr(sigma: float) -> float:
    """lambda = log((1 - sigma) / sigma): -inf at sigma = 1, +inf at sigma = 0."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log(1 - sigma) - math.log(sigma)


# DPM-Solver++ (first order, = DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) x0_s, h = lambda_t -
# lambda_s; with exp(-h) = sigma_t alpha_s / (alpha_t sigma_s) this is (sigma_t / sigma_s)(x_s - alpha_s x0_s) +
# alpha_t x0_s, finite at sigma_s = 1 and sigma_t = 0.
# DPM-Solver++(2M): x0_s is replaced by D = (1 + 1 / (2 r)) x0_s - x0_prev / (2 r), r = h_prev / h,
# h_prev = lambda_s - lambda_prev.
def dpm_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, x0_prev: torch.Tensor | None = None,
             sigma_prev: float | None = None) -> torch.Tensor:
    """One step from sigma to sigma_next (python floats, computed in float64) of x `[B, ...]` with the data
    prediction x0 `[B, ...]` at sigma; with x0_prev (the data prediction at sigma_prev, the previous level) the
    second-order multistep update, else the first-order one. Returns float32 `[B, ...]`."""
    x, x0 = x.float(), x0.float()
    alpha_next = 1 - sigma_next
    if x0_prev is not None:
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        r = (half_log_snr(sigma) - half_log_snr(sigma_prev)) / h
        if math.isfinite(r):  # sigma_prev = 1 gives r = inf: no correction
            x0 = (1 + 1 / (2 * r)) * x0 - x0_prev.float() / (2 * r)
        return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * x0
    return (sigma_next / sigma) * (x - (1 - sigma) * x0) + alpha_next * x0


def sample_dpm2m(velocity: Callable[[torch.Tensor, int], torch.Tensor], x1: torch.Tensor,
                 sigmas: list[float]) -> torch.Tensor:
    """Deterministic DPM-Solver++(2M) from x1 `[B, ...]` at sigmas[0] (= 1) to sigmas[-1] (= 0); velocity(x, i) is
    the velocity at step i (level sigmas[i]), float. First order at the first step and the last (the authors' `dpm2`
    for T < 15), second order between. Returns the final sample, float32."""
    x, x0_prev, num_steps = x1.float(), None, len(sigmas) - 1
    for i in range(num_steps):
        x0 = x - sigmas[i] * velocity(x, i).float()
        second = 0 < i < num_steps - 1
        x = dpm_step(x, x0, sigmas[i], sigmas[i + 1], x0_prev if second else None, sigmas[i - 1] if second else None)
        x0_prev = x0
    return x


def integer_timestep_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The levels the transformer is told while DiffusionNFT samples: the integer timestep int(1000 sigma) (float32
    product, truncated as the authors' long conversion) over 1000, float32. The solver itself keeps the exact levels.
    1000 times such a level is the integer exactly except for 10 of the 1001 values (within one float32 ulp)."""
    return (sigmas.float() * 1000).long().float() / 1000
