"""Per-epoch diagnostics of the FD targets and the SPO trust region (docs/toy.md, "Diagnostics on SD3 runs").

Pure tensor functions: no model, no config. They answer whether a run's step is limited by the trust region: the SPO
optimum moves the velocity by about eps * rms(delta) / 2 per epoch, delta = (x0_a - x0_b) / 2 the half branch
separation of a pair (docs/algorithm.md §3-§4).

Quantiles are `torch.quantile`'s default, linear interpolation between order statistics: for n sorted values
v_0 <= ... <= v_{n-1}, q(p) = v_i + (h - i) (v_{i+1} - v_i) with h = p (n - 1), i = floor(h) (numpy's "linear").
"""

from __future__ import annotations

import math

import torch

KEYS = ("branch_rms_p25", "branch_rms_p50", "branch_rms_p75", "dx_sq_mean", "ratio_dev_p50", "ratio_dev_p90")


def pair_mean_square(final_latents: torch.Tensor) -> torch.Tensor:
    """mean(delta^2) over the latent of each pair, delta = (x0_a - x0_b) / 2: `[2P, ...]` (a0, b0, a1, b1, ...) ->
    `[P]` float32. This is the unnormalised mean(dx^2), the normaliser m of `fdfo.objective.pair_targets`."""
    if len(final_latents) % 2:
        raise ValueError(f"expected interleaved pairs: got {len(final_latents)} latents")
    x = final_latents.float().reshape(-1, 2, *final_latents.shape[1:])
    return ((x[:, 0] - x[:, 1]) / 2).square().flatten(1).mean(dim=1)


def ratio_deviation(ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """|rho - 1| / eps of each item, float32: 1 is the edge of the trust region, where the SPO optimum sits."""
    return (ratio.detach().float() - 1).abs() / clip_range


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    if len(values) == 0:
        return [math.nan] * len(qs)
    return torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64, device=values.device)).tolist()


def epoch_diagnostics(pair_msq: torch.Tensor, ratio_dev: torch.Tensor) -> dict[str, float]:
    """The logged record of one epoch (keys `KEYS`).

    pair_msq: `[P]` mean(delta^2) of the epoch's valid pairs (all ranks); ratio_dev: `[N]` |rho - 1| / eps of the
    epoch's trained items (all ranks), each at the parameters of the optimizer step that trained it.
    branch_rms_p* are quartiles of sqrt(pair_msq); dx_sq_mean is the mean of pair_msq (the mean normaliser m).
    """
    rms = _quantiles(pair_msq.sqrt(), (0.25, 0.5, 0.75))
    dev = _quantiles(ratio_dev, (0.5, 0.9))
    dx_sq_mean = float(pair_msq.double().mean()) if len(pair_msq) else math.nan
    return dict(zip(KEYS, [*rms, dx_sq_mean, *dev]))
