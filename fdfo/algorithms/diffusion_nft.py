"""DiffusionNFT's pieces (docs/algorithm.md §11): reward -> optimality, the implicit positive and negative
policies, the adaptively weighted loss and the old-policy update coefficient.

Pure tensor functions. Flow convention as docs/algorithm.md §1: x_t = (1 - t) x0 + t e, v ~ e - x0, so the data
predicted from a velocity is x0_hat = x_t - t v.
"""

from __future__ import annotations

import torch

from fdfo.algorithms.dpm_solver import integer_timestep_sigmas, sample_dpm2m
from fdfo.algorithms.flow_grpo import group_advantages, trained_steps  # trained_steps: int(0.99 T) as Flow-GRPO

WEIGHT_FLOOR = 1e-5
LOSS_SCALE = 5.0
REF_WEIGHT = 1e-4


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value if value.ndim == 0 else value.reshape(-1, *([1] * (like.ndim - 1)))


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


# docs/algorithm.md §11: r = clamp(A / 10 + 0.5, 0, 1) with Flow-GRPO's group-relative A (clipped to +-5).
def optimality(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """rewards, groups: `[B]` (groups: prompt id). Returns the optimality probability r `[B]` in [0, 1]."""
    return (group_advantages(rewards, groups) / 10 + 0.5).clamp(0, 1)


# docs/algorithm.md §11: v+ = beta v_theta + (1 - beta) sg(v_old), v- = (1 + beta) sg(v_old) - beta v_theta.
def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative implicit velocities, `[B, ...]` each; gradients flow through v_theta only."""
    v_old = v_old.detach()
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


# docs/algorithm.md §11: x0^+- = x_t - t v^+-, w^+- = max(sg(mean|x0^+- - x0|), 1e-5),
# L^+- = mean((x0^+- - x0)^2) / w^+-,
# loss = mean(5 [r L+ + (1 - r) L-] / beta) + 1e-4 mean((v_theta - v_ref)^2).
def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: float | torch.Tensor,
    r: torch.Tensor,
    beta: float,
    ref_weight: float = REF_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of a batch of training items.

    v_theta, v_old, v_ref, x_t, x0: `[N, ...]` (x_t = (1 - t) x0 + t e with fresh e per item); t: float or `[N]`;
    r: `[N]` optimality of each item's sample. Returns (loss, stats) with stats loss_pos, loss_neg, ref (detached).
    """
    terms, stats = nft_loss_terms(v_theta, v_old, v_ref, x_t, x0, t, r, beta)
    stats = {key: value.mean().detach() for key, value in stats.items()}
    return terms[0].mean() + ref_weight * terms[1].mean(), stats


def nft_loss_terms(v_theta, v_old, v_ref, x_t, x0, t, r, beta: float):
    """Per item: ((policy term `[N]`, reference term `[N]`), stats loss_pos, loss_neg, ref `[N]`); nft_loss is
    mean(policy) + 1e-4 mean(ref)."""
    if beta <= 0:
        raise ValueError(f"DiffusionNFT beta must be > 0, got {beta}")
    v_theta, x_t, x0 = v_theta.float(), x_t.float(), x0.float()
    t = _per_sample(t, x_t)
    v_pos, v_neg = implicit_policies(v_theta, v_old.float(), beta)
    per_side = []
    for v in (v_pos, v_neg):
        error = x_t - t * v - x0
        weight = _sample_mean(error.abs()).detach().clamp_min(WEIGHT_FLOOR)
        per_side.append(_sample_mean(error.square()) / weight)
    loss_pos, loss_neg = per_side
    r = r.float()
    policy = LOSS_SCALE * (r * loss_pos + (1 - r) * loss_neg) / beta
    ref = _sample_mean((v_theta - v_ref.float()).square())
    return (policy, ref), {"loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach(), "ref": ref.detach()}


# docs/algorithm.md §11: after each epoch old <- d old + (1 - d) theta with d = min(0.001 s, 0.5), s the global
# step after the epoch's update, counted from 1 as the authors count it (0.001 after the first step, not 0).
def old_policy_decay(step: int) -> float:
    """The weight kept by the old (sampling) policy after optimizer step `step` (>= 1)."""
    return min(0.001 * step, 0.5)


# ----------------------------------------------------------------------------------------------------------------------
# DiffusionNFT in the training loop (fdfo/phases.py runs the shared sampling, exchange and optimizer loops; the
# sampling adapter `old` and the evaluated EMA are fdfo.algorithms.ema.Copies).

NEEDS_X0 = True  # whether item_loss reads the sample's final latent
WHOLE_TRAJECTORIES = False  # one optimizer step per epoch: every step holds all items anyway
ITEM_KEYS = ("x_t", "v_old", "v_ref")


@torch.no_grad()
def rollout(policy, x1: torch.Tensor, cond: dict, sigmas: torch.Tensor, noise, cfg) -> tuple[torch.Tensor, dict]:
    """Deterministic DPM-Solver++(2M) rollouts (the authors' `dpm2`; the transformer is told the integer timesteps
    int(1000 sigma)) from x1 `[b, ...]` with the current (old) adapter, then the training items.

    Per sample K distinct timesteps (drawn from `noise`, so from the sample's own stream) and fresh e per item:
    x_t = (1 - t) x0 + t e. v_old (the sampling adapter) and v_ref (adapters off) at x_t are computed here, so
    training needs one forward of theta per item. Returns (x0 `[b, ...]`, items `[b, K, ...]` + timestep `[b, K]`).
    """
    told = integer_timestep_sigmas(sigmas)
    x0 = sample_dpm2m(lambda x, i: policy.velocity(x, told[i].expand(len(x)), cond), x1, sigmas.double().tolist())
    num_steps, k = len(sigmas) - 1, trained_steps(len(sigmas) - 1)
    order = noise().flatten(1)[:, :num_steps].argsort(dim=1)[:, :k].sort(dim=1).values  # K distinct steps each
    items = {key: [] for key in ITEM_KEYS}
    for j in range(k):
        t = sigmas[order[:, j]].float()
        x_t = (1 - t).reshape(-1, *([1] * (x0.ndim - 1))) * x0 + t.reshape(-1, *([1] * (x0.ndim - 1))) * noise()
        items["x_t"].append(x_t)
        items["v_old"].append(policy.velocity(x_t, t, cond))
        items["v_ref"].append(policy.base_velocity(x_t, t, cond))
    out = {key: torch.stack(value, dim=1) for key, value in items.items()}
    out["timestep"] = order
    return x0, out


def sample_weights(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-sample optimality r `[B]` from all ranks' finite rewards `[B]` and prompt ids `[B]`."""
    return optimality(rewards, groups)


def item_loss(policy, module, batch: dict, sigmas: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """Per-item nft loss `[n]` of a micro-batch and per-item stats; batch: x_t, v_old, v_ref, timestep, x0,
    weight (r), cond."""
    t = sigmas[batch["timestep"]]
    v = policy.velocity(batch["x_t"], t, batch["cond"], module=module)
    (policy_term, ref), _ = nft_loss_terms(v, batch["v_old"], batch["v_ref"], batch["x_t"], batch["x0"], t,
                                           batch["weight"], cfg.baseline.nft_beta)
    return policy_term + REF_WEIGHT * ref, {"policy_loss": policy_term.detach(), "kl": ref.detach(),
                                            "clipfrac": torch.zeros_like(ref)}


def kept_samples(weights: torch.Tensor) -> torch.Tensor:
    """Every sample enters DiffusionNFT's loss mean (r = 0.5 still pulls towards old); bool `[B]`."""
    return torch.ones_like(weights, dtype=torch.bool)
