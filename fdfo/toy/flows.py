"""Conditional rectified flows with a closed-form velocity, toy rewards and the trainable residual network.

Each "prompt" p owns a Gaussian mixture of K modes (means m_pk, isotropic std s, equal weights) in R^d. Flow as
docs/algorithm.md §1: x(sigma) = (1 - sigma) x0 + sigma e. Given mode k, x(sigma) ~ N((1 - sigma) m_k, c^2 I) with
c^2 = (1 - sigma)^2 s^2 + sigma^2, so with posterior mode weights w_k(x) the exact velocity E[e - x0 | x] is
    v(x, sigma) = sum_k w_k(x) [ (sigma - (1 - sigma) s^2) / c^2 (x - (1 - sigma) m_k) - m_k ].
The model is v_exact + net(x, sigma, prompt) with the net's output layer zero-initialised, the toy's LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyProblem:
    """means: `[P, K, d]` mode centres; targets: `[P, d]` each prompt's rewarded point; mode_std: s."""

    means: torch.Tensor
    targets: torch.Tensor
    mode_std: float

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_prompts(self) -> int:
        return self.means.shape[0]


def make_problem(dim: int, prompts: int, modes: int, mode_std: float, seed: int) -> ToyProblem:
    """Random mode centres ~ N(0, I) per prompt. Each prompt's target is a point between its first two modes and
    off their line (m_0 + 0.3 (m_1 - m_0) + 0.3 u, u ~ N(0, I)): the reward prefers part of the distribution, so a
    method can raise it by collapsing the other modes, which the diversity metrics show."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(prompts, modes, dim, generator=g)
    second = means[:, 1] if modes > 1 else means[:, 0]
    targets = means[:, 0] + 0.3 * (second - means[:, 0]) + 0.3 * torch.randn(prompts, dim, generator=g)
    return ToyProblem(means=means, targets=targets, mode_std=mode_std)


def exact_velocity(problem: ToyProblem, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """x: `[B, d]`; sigma: `[B]`; prompt: `[B]` long. Returns the exact velocity `[B, d]` (module docstring)."""
    m = problem.means[prompt]  # [B, K, d]
    s2 = problem.mode_std**2
    sig = sigma.float().reshape(-1, 1, 1)
    c2 = (1 - sig) ** 2 * s2 + sig**2
    diff = x[:, None, :] - (1 - sig) * m  # [B, K, d]
    logits = -diff.square().sum(-1) / (2 * c2[:, :, 0])  # [B, K]; equal weights and a shared c cancel
    w = torch.softmax(logits, dim=1)[:, :, None]
    return (w * ((sig - (1 - sig) * s2) / c2 * diff - m)).sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# Rewards: per-element mean squared distance to the prompt's target keeps the scale independent of d.


def smooth_reward(problem: ToyProblem, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """r = -mean((x - target)^2), differentiable. `[B, d]` -> `[B]`."""
    return -(x - problem.targets[prompt]).square().mean(-1)


def bump_reward(problem: ToyProblem, x: torch.Tensor, prompt: torch.Tensor, width: float = 0.5) -> torch.Tensor:
    """r = exp(-mean((x - target)^2) / (2 width^2)), a Gaussian bump in [0, 1]."""
    return torch.exp(smooth_reward(problem, x, prompt) / (2 * width**2))


def quantised_reward(problem: ToyProblem, x: torch.Tensor, prompt: torch.Tensor, levels: int = 10) -> torch.Tensor:
    """Black box: the bump rounded down to `levels` steps; piecewise constant, so grad r is zero almost everywhere."""
    return torch.floor(bump_reward(problem, x, prompt) * levels) / levels


REWARDS = {"smooth": smooth_reward, "bump": bump_reward, "quantised": quantised_reward}


# ----------------------------------------------------------------------------------------------------------------------
# The trainable correction.


class ResidualNet(nn.Module):
    """net(x, sigma, prompt) -> `[B, d]`: an MLP on (x, Fourier features of sigma, a learned prompt embedding) whose
    output layer starts at zero, so v = v_exact at initialisation (as a LoRA with B = 0)."""

    def __init__(self, dim: int, prompts: int, hidden: int = 128, embed: int = 16, freqs: int = 8):
        super().__init__()
        # angular frequencies pi/32 ... pi 2^(freqs - 6): periods from 64 down to a fraction of the sigma range
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(-5, freqs - 5, dtype=torch.float32))
        self.prompt = nn.Embedding(prompts, embed)
        self.body = nn.Sequential(
            nn.Linear(dim + 2 * freqs + embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        angle = sigma.float()[:, None] * self.freqs
        features = torch.cat([x, torch.sin(angle), torch.cos(angle), self.prompt(prompt)], dim=1)
        return self.out(self.body(features))


def model_velocity(problem: ToyProblem, net: nn.Module | None, x: torch.Tensor, sigma: torch.Tensor,
                   prompt: torch.Tensor) -> torch.Tensor:
    """v = v_exact + net(...); net None is the reference (the adapter switched off)."""
    v = exact_velocity(problem, x, sigma, prompt)
    return v if net is None else v + net(x, sigma, prompt)
