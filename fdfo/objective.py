"""Finite-difference targets and the SPO-style surrogate loss (docs/algorithm.md §3–§4).

Pure tensor functions: no model, no config. Per-sample tensors are in the interleaved pair order a0, b0, a1, b1, ...
"""

from __future__ import annotations

import torch

DX_EPS = 1e-6


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: `[B, ...] -> [B]`."""
    return x.flatten(1).mean(dim=1)


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1)))


# docs/algorithm.md §3: dR = +-(R_a - R_b)/2, dx = +-(x0_a - x0_b)/2 normalised by (mean(dx^2) + 1e-6).
def pair_targets(rewards: torch.Tensor, final_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite-difference reward and direction of every sample.

    rewards:       `[2P]` in order a0, b0, a1, b1, ...
    final_latents: `[2P, ...]` same order.
    Returns (dR `[2P]`, dx `[2P, ...]`), float32; branch b of a pair gets the negatives of branch a.
    The target velocity at every timestep of a sample is then `v_ref - dx`.
    """
    if len(rewards) % 2 or len(rewards) != len(final_latents):
        raise ValueError(f"expected interleaved pairs: got {len(rewards)} rewards and {len(final_latents)} latents")
    r = rewards.float().reshape(-1, 2)
    x = final_latents.float().reshape(-1, 2, *final_latents.shape[1:])
    half_dr = (r[:, 0] - r[:, 1]) / 2
    half_dx = (x[:, 0] - x[:, 1]) / 2
    dr = torch.stack([half_dr, -half_dr], dim=1).reshape(-1)
    dx = torch.stack([half_dx, -half_dx], dim=1).reshape(final_latents.shape)
    m = _sample_mean(dx.square())
    return dr, dx / _per_sample(m + DX_EPS, dx)


# docs/algorithm.md §4: rho = exp(l - l_ref), l = -mean((v - v*)^2), v* = v_ref - dx;
# L = -dR rho + |dR|/(2 eps) (rho-1)^2.
def spo_loss(
    v: torch.Tensor,
    v_ref: torch.Tensor,
    dx: torch.Tensor,
    dR: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Surrogate loss of each training item.

    v, v_ref, dx: `[N, ...]` current prediction, sampling-time velocity, normalised FD direction.
    dR: `[N]` reward difference. Returns (loss `[N]`, ratio `[N]`), float32.
    At v = v_ref the ratio is 1 and d loss / d v = 2 dR dx / (elements per item).
    """
    v, v_ref, dx, dR = v.float(), v_ref.float(), dx.float(), dR.float()
    target = v_ref - dx
    log_ratio = -_sample_mean((v - target).square()) + _sample_mean(dx.square())
    return _surrogate(log_ratio, dR, clip_range)


def _surrogate(log_ratio: torch.Tensor, dR: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The SPO loss form of both ratios: L = -dR rho + |dR|/(2 eps) (rho - 1)^2 with rho = exp(log_ratio), all `[N]`."""
    ratio = torch.exp(log_ratio)
    loss = -dR * ratio + dR.abs() / (2 * clip_range) * (ratio - 1).square()
    return loss, ratio


def clip_fraction(ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Fraction of items whose ratio left the trust region, `mean(|rho - 1| > eps)` (a logging statistic)."""
    return ((ratio - 1).abs() > clip_range).float().mean()


# Opt-in variant (docs/toy.md, "The trust-region scale"): the log-ratio of spo_loss scaled by c = 1 / (2 rms(dx)),
# about rms(delta) / 2, so |rho - 1| = eps is a velocity change of about eps (rms per element) along the FD direction,
# whatever the branch separation; the default's edge is a change of about eps * rms(delta) / 2.
def spo_loss_velocity_region(
    v: torch.Tensor,
    v_ref: torch.Tensor,
    dx: torch.Tensor,
    dR: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`spo_loss` with the trust region in velocity units: rho = exp(c (l - l_ref)), c = 1 / (2 sqrt(mean(dx^2))).

    Same shapes and loss form as `spo_loss` (L = -dR rho + |dR|/(2 eps) (rho - 1)^2). For v = v_ref - t dx / rms(dx),
    a change of rms t along the FD direction, log rho = t - t^2 / (2 rms(dx)) ~ t. An item with dx = 0 (a dropped pair,
    identical branches) has no direction: c = 0, rho = 1, and with its dR = 0 a zero loss and gradient.
    """
    v, v_ref, dx, dR = v.float(), v_ref.float(), dx.float(), dR.float()
    msq = _sample_mean(dx.square())
    scale = torch.where(msq > 0, 0.5 / msq.sqrt().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    log_ratio = (-_sample_mean((v - (v_ref - dx)).square()) + msq) * scale
    return _surrogate(log_ratio, dR, clip_range)
