"""The four training methods on a toy flow, each as two phases: `build` samples a batch and scores it (the reward
evaluations), `loss` is the objective on a subset of the resulting training items. Training shuffles the items and
takes `grad_steps` optimizer steps per epoch; the direction analysis differentiates `loss` on all items at once.

FDFO calls fdfo.sampling (prior_churn, churn_step) and fdfo.objective (pair_targets, spo_loss); the baselines call
fdfo.algorithms. Items are dicts of tensors whose first dimension indexes the training items.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fdfo.algorithms import diffusion_nft as nft
from fdfo.algorithms import flow_grpo as grpo
from fdfo.algorithms.ema import blend_, ema_decay
from fdfo.objective import pair_targets, spo_loss, spo_loss_velocity_region
from fdfo.sampling import churn_step, prior_churn
from fdfo.toy.flows import ToyProblem, model_velocity

Items = dict[str, torch.Tensor]
RewardFn = Callable[[ToyProblem, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Hyper:
    """One method's knobs. `clip`: SPO clip (fdfo) or PPO clip (flow_grpo); `churn`: FDFO's gamma; `kl`: Flow-GRPO's
    beta; `nft_beta`: DiffusionNFT's beta; `sde_a`: Flow-GRPO's noise level; `group`: samples per prompt. The
    defaults are ToyConfig's (fdfo/toy/run.py), which builds this record."""

    lr: float
    clip: float
    churn: float
    kl: float
    nft_beta: float
    group: int
    sde_a: float = 0.7  # §11's a; not a toy flag
    trust_region: str = "separation"  # FDFO's SPO ratio: spo_loss ("separation") or spo_loss_velocity_region


@dataclass
class Context:
    problem: ToyProblem
    net: nn.Module
    reward: RewardFn
    sigmas: torch.Tensor
    hyper: Hyper
    generator: torch.Generator
    old: nn.Module | None = None  # DiffusionNFT's sampling policy
    ema: nn.Module | None = None  # DiffusionNFT's evaluated policy
    state: dict = field(default_factory=dict)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def prompts(self, count: int) -> torch.Tensor:
        return torch.randint(self.problem.num_prompts, (count,), generator=self.generator)


def _repeat_steps(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample `[B, ...]` -> per-item `[B * steps, ...]`, sample-major (item = sample * steps + step)."""
    return x.repeat_interleave(steps, dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# FDFO (docs/algorithm.md §2-§4): pairs with churn, finite-difference targets, SPO loss.


@torch.no_grad()
def fdfo_build(ctx: Context, samples: int) -> Items:
    pairs, d, steps = samples // 2, ctx.problem.dim, len(ctx.sigmas) - 1
    prompt = ctx.prompts(pairs).repeat_interleave(2)
    x = prior_churn(ctx.randn(pairs, d).repeat_interleave(2, dim=0), ctx.hyper.churn, ctx.randn(2 * pairs, d))
    states, velocities = [], []
    for k in range(steps):
        sigma = ctx.sigmas[k].expand(len(x))
        v = model_velocity(ctx.problem, ctx.net, x, sigma, prompt)
        states.append(x)
        velocities.append(v)
        gamma = ctx.hyper.churn if k < steps - 1 else 0.0  # the step landing on sigma = 0 never churns
        x = churn_step(x, v, ctx.sigmas[k], ctx.sigmas[k + 1], gamma, ctx.randn(*x.shape))
    rewards = ctx.reward(ctx.problem, x, prompt)
    dr, dx = pair_targets(rewards, x)
    return {
        "state": torch.stack(states, 1).flatten(0, 1),
        "v_ref": torch.stack(velocities, 1).flatten(0, 1),
        "sigma": ctx.sigmas[:-1].repeat(len(x)),
        "prompt": _repeat_steps(prompt, steps),
        "dx": _repeat_steps(dx, steps),
        "dR": _repeat_steps(dr, steps),
        "reward": rewards,
    }


def fdfo_loss(ctx: Context, items: Items) -> torch.Tensor:
    v = model_velocity(ctx.problem, ctx.net, items["state"], items["sigma"], items["prompt"])
    loss = spo_loss_velocity_region if ctx.hyper.trust_region == "velocity" else spo_loss
    return loss(v, items["v_ref"], items["dx"], items["dR"], ctx.hyper.clip)[0].mean()


# ----------------------------------------------------------------------------------------------------------------------
# Flow-GRPO (docs/algorithm.md §11): SDE rollouts, group advantages, clipped per-step ratio, KL to the base flow.


def _grouped_prompts(ctx: Context, samples: int) -> torch.Tensor:
    if samples % ctx.hyper.group:
        raise ValueError(f"samples per epoch ({samples}) must be a multiple of the group size {ctx.hyper.group}")
    return ctx.prompts(samples // ctx.hyper.group).repeat_interleave(ctx.hyper.group)


@torch.no_grad()
def grpo_build(ctx: Context, samples: int) -> Items:
    prompt, sig = _grouped_prompts(ctx, samples), ctx.sigmas
    x = ctx.randn(samples, ctx.problem.dim)
    trained = int(0.99 * (len(sig) - 1))
    keep: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "x_next", "logp_old", "mean_ref", "sigma", "next")}
    for k in range(len(sig) - 1):
        v = model_velocity(ctx.problem, ctx.net, x, sig[k].expand(samples), prompt)
        x_next, mean, step_std = grpo.sde_step(x, v, sig[k], sig[k + 1], ctx.randn(*x.shape), ctx.hyper.sde_a, sig[1])
        if k < trained:
            v_ref = model_velocity(ctx.problem, None, x, sig[k].expand(samples), prompt)
            _, mean_ref, _ = grpo.sde_step(x, v_ref, sig[k], sig[k + 1], torch.zeros_like(x), ctx.hyper.sde_a, sig[1])
            for name, value in (("x", x), ("x_next", x_next), ("logp_old", grpo.step_log_prob(x_next, mean, step_std)),
                                ("mean_ref", mean_ref), ("sigma", sig[k].expand(samples)),
                                ("next", sig[k + 1].expand(samples))):
                keep[name].append(value)
        x = x_next
    rewards = ctx.reward(ctx.problem, x, prompt)
    items = {name: torch.stack(values, 1).flatten(0, 1) for name, values in keep.items()}
    items["prompt"] = _repeat_steps(prompt, trained)
    items["adv"] = _repeat_steps(grpo.group_advantages(rewards, prompt), trained)
    items["reward"] = rewards
    return items


def grpo_loss(ctx: Context, items: Items) -> torch.Tensor:
    x, sigma, prompt = items["x"], items["sigma"], items["prompt"]
    v = model_velocity(ctx.problem, ctx.net, x, sigma, prompt)
    _, mean, step_std = grpo.sde_step(x, v, sigma, items["next"], torch.zeros_like(x), ctx.hyper.sde_a, ctx.sigmas[1])
    logp = grpo.step_log_prob(items["x_next"], mean, step_std)
    kl_std = grpo.sde_noise_level(sigma, ctx.hyper.sde_a, ctx.sigmas[1])  # the KL's std has no (-dt) factor (§11)
    loss, _ = grpo.clipped_loss(logp, items["logp_old"], items["adv"], ctx.hyper.clip, mean, items["mean_ref"],
                                kl_std, ctx.hyper.kl)
    return loss


# ----------------------------------------------------------------------------------------------------------------------
# DiffusionNFT (docs/algorithm.md §11): deterministic rollouts by the old policy, optimality-weighted implicit
# policies.


@torch.no_grad()
def nft_build(ctx: Context, samples: int) -> Items:
    prompt, sig = _grouped_prompts(ctx, samples), ctx.sigmas
    steps = len(sig) - 1
    x = ctx.randn(samples, ctx.problem.dim)
    for k in range(steps):
        x = x + (sig[k + 1] - sig[k]) * model_velocity(ctx.problem, ctx.old, x, sig[k].expand(samples), prompt)
    rewards = ctx.reward(ctx.problem, x, prompt)
    r = nft.optimality(rewards, prompt)
    chosen = torch.rand(samples, steps, generator=ctx.generator).argsort(dim=1)[:, : steps - 1]  # T-1 of T levels
    t = sig[:-1][chosen].flatten()
    per = steps - 1
    x0, item_prompt = _repeat_steps(x, per), _repeat_steps(prompt, per)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * ctx.randn(*x0.shape)
    v_old = model_velocity(ctx.problem, ctx.old, x_t, t, item_prompt)
    return {"x0": x0, "x_t": x_t, "t": t, "prompt": item_prompt, "r": _repeat_steps(r, per), "v_old": v_old,
            "reward": rewards}


def nft_loss(ctx: Context, items: Items) -> torch.Tensor:
    x_t, t, prompt = items["x_t"], items["t"], items["prompt"]
    v = model_velocity(ctx.problem, ctx.net, x_t, t, prompt)
    with torch.no_grad():
        v_ref = model_velocity(ctx.problem, None, x_t, t, prompt)
    return nft.nft_loss(v, items["v_old"], v_ref, x_t, items["x0"], t, items["r"], ctx.hyper.nft_beta)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Backprop through the deterministic sampler: the reference that uses grad r.


@torch.no_grad()
def backprop_build(ctx: Context, samples: int) -> Items:
    return {"x1": ctx.randn(samples, ctx.problem.dim), "prompt": ctx.prompts(samples)}


def euler_with_grad(problem: ToyProblem, net: nn.Module | None, x: torch.Tensor, prompt: torch.Tensor,
                    sigmas: torch.Tensor) -> torch.Tensor:
    for k in range(len(sigmas) - 1):
        x = x + (sigmas[k + 1] - sigmas[k]) * model_velocity(problem, net, x, sigmas[k].expand(len(x)), prompt)
    return x


def backprop_loss(ctx: Context, items: Items) -> torch.Tensor:
    x0 = euler_with_grad(ctx.problem, ctx.net, items["x1"], items["prompt"], ctx.sigmas)
    return -ctx.reward(ctx.problem, x0, items["prompt"]).mean()


METHODS = {
    "fdfo": (fdfo_build, fdfo_loss),
    "flow_grpo": (grpo_build, grpo_loss),
    "diffusion_nft": (nft_build, nft_loss),
    "backprop": (backprop_build, backprop_loss),
}


def setup(ctx: Context, algorithm: str) -> None:
    """Per-method extra state: DiffusionNFT's old (sampling) and EMA (evaluated) copies of the net."""
    if algorithm == "diffusion_nft":
        ctx.old = copy.deepcopy(ctx.net).requires_grad_(False)
        ctx.ema = copy.deepcopy(ctx.net).requires_grad_(False)


def evaluated_net(ctx: Context) -> nn.Module:
    return ctx.ema if ctx.ema is not None else ctx.net


def train_epoch(ctx: Context, algorithm: str, optimizer: torch.optim.Optimizer, samples: int, grad_steps: int,
                epoch: int) -> None:
    """Sample `samples` rollouts (= reward evaluations), then `grad_steps` optimizer steps over the shuffled items."""
    build, loss_fn = METHODS[algorithm]
    items = build(ctx, samples)
    items.pop("reward", None)
    order = torch.randperm(len(next(iter(items.values()))), generator=ctx.generator)
    params = [p for p in ctx.net.parameters() if p.requires_grad]
    step = epoch * grad_steps  # global optimizer steps done, so the first step below is step 1 (as the authors count)
    for chunk in order.chunk(grad_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ctx, {k: v[chunk] for k, v in items.items()}).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if ctx.ema is not None:  # DiffusionNFT's EMA: every step, with the (1 + s) / (10 + s) warm-up capped at 0.9
            blend_(list(ctx.ema.parameters()), list(ctx.net.parameters()), keep=ema_decay(step))
    if ctx.old is not None:  # old's coefficient min(0.001 s, 0.5): 0.001 after the first step, not 0
        blend_(list(ctx.old.parameters()), list(ctx.net.parameters()), keep=nft.old_policy_decay(step))


def loss_gradient(ctx: Context, algorithm: str, samples: int) -> torch.Tensor:
    """The method's update direction -grad(loss) for one batch of `samples` reward evaluations, flattened."""
    build, loss_fn = METHODS[algorithm]
    items = build(ctx, samples)
    items.pop("reward", None)
    params = [p for p in ctx.net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(ctx, items), params, allow_unused=True)
    return -torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
