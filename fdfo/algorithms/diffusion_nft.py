"""DiffusionNFT's pieces (docs/algorithm.md §11): reward -> optimality, the implicit positive and negative
policies, the adaptively weighted loss and the old-policy update coefficient.

Pure tensor functions. Flow convention as docs/algorithm.md §1: x_t = (1 - t) x0 + t e, v ~ e - x0, so the data
predicted from a velocity is x0_hat = x_t - t v.
"""

from __future__ import annotations

import torch

from fdfo.algorithms.flow_grpo import group_advantages

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
    policy = (LOSS_SCALE * (r * loss_pos + (1 - r) * loss_neg) / beta).mean()
    ref = _sample_mean((v_theta - v_ref.float()).square()).mean()
    stats = {"loss_pos": loss_pos.mean().detach(), "loss_neg": loss_neg.mean().detach(), "ref": ref.detach()}
    return policy + ref_weight * ref, stats


# docs/algorithm.md §11: after each epoch old <- d old + (1 - d) theta with d = min(0.001 step, 0.5).
def old_policy_decay(step: int) -> float:
    """The weight kept by the old (sampling) policy after `step` updates (0 at first: old becomes theta)."""
    return min(0.001 * step, 0.5)


@torch.no_grad()
def blend_(target: list[torch.Tensor], source: list[torch.Tensor], keep: float) -> None:
    """In place: target <- keep * target + (1 - keep) * source, tensor by tensor (old-policy update and EMA)."""
    for t, s in zip(target, source, strict=True):
        t.mul_(keep).add_(s.detach().to(t.dtype), alpha=1 - keep)
