"""Flow-GRPO's pieces (docs/algorithm.md §11): the SDE sampler step with its Gaussian log-probability,
group-relative advantages and the PPO-style clipped loss with a KL term to the reference policy.

Pure tensor functions. Flow convention as docs/algorithm.md §1: x(sigma) = (1 - sigma) x0 + sigma e, v ~ e - x0,
sampling runs sigma from 1 down to 0.
"""

from __future__ import annotations

import math

import torch

ADV_EPS = 1e-4
ADV_CLIP = 5.0


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value if value.ndim == 0 else value.reshape(-1, *([1] * (like.ndim - 1)))


def _sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


# docs/algorithm.md §11: std = a sqrt(sigma / (1 - sigma)); at sigma = 1 the second grid level replaces sigma in
# the denominator, so the first step's noise stays finite.
def sde_noise_level(sigma: float | torch.Tensor, a: float, sigma_second: float | torch.Tensor) -> torch.Tensor:
    """The SDE's diffusion coefficient at level sigma (float or `[B]`); `sigma_second` is the grid's second level."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denominator = torch.where(sigma >= 1, 1 - torch.as_tensor(sigma_second, dtype=torch.float32), 1 - sigma)
    return a * torch.sqrt(sigma / denominator)


# docs/algorithm.md §11: mu = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt,
# x' = mu + std sqrt(-dt) n with dt = sigma_next - sigma < 0.
def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise: torch.Tensor,
    a: float,
    sigma_second: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step from sigma to sigma_next (floats or `[B]`). x, v, noise: `[B, ...]`.

    Returns (x_next, mean, step_std), float32; x_next = mean + step_std * noise, and step_std = std * sqrt(-dt)
    (broadcastable against x) is the standard deviation of the Gaussian transition. With a = 0 the mean is the
    Euler step x + dt v.
    """
    x, v, noise = x.float(), v.float(), noise.float()
    s = _per_sample(sigma, x)
    dt = _per_sample(sigma_next, x) - s
    std = _per_sample(sde_noise_level(sigma, a, sigma_second).to(x.device), x)
    mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    step_std = std * torch.sqrt(-dt)
    return mean + step_std * noise, mean, step_std


# docs/algorithm.md §11: logp = mean(-(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)), s = std sqrt(-dt), in fp32.
def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """Per-sample log-density of the transition, averaged over latent elements. `[B, ...]` -> `[B]` float32."""
    x_next, mean = x_next.float(), mean.float()
    step_std = torch.as_tensor(step_std, dtype=torch.float32, device=x_next.device).expand_as(x_next)
    logp = -(x_next - mean).square() / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi)
    return _sample_mean(logp)


# docs/algorithm.md §11: A = (R - mean over the prompt's group) / (std over all samples + 1e-4), clipped to +-5.
def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, clip: float = ADV_CLIP) -> torch.Tensor:
    """rewards, groups: `[B]` (groups: integer prompt id of each sample). Returns `[B]` float32 advantages.

    The global std is the population std (divide by B), as numpy's default that the published code uses.
    """
    rewards = rewards.float()
    if rewards.shape != groups.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must have one shape")
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1, device=rewards.device).index_add_(0, index, torch.ones_like(rewards))
    total = torch.zeros_like(count).index_add_(0, index, rewards)
    centred = rewards - (total / count)[index]
    return (centred / (rewards.std(correction=0) + ADV_EPS)).clamp(-clip, clip)


# docs/algorithm.md §11: L = mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))) + beta mean((mu - mu_ref)^2 / (2 std^2)),
# std = a sqrt(sigma / (1 - sigma)): the KL term has no (-dt) factor, unlike the transition's own variance std^2 (-dt).
def clipped_loss_terms(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mean: torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    kl_std: torch.Tensor | float | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item (policy term, KL term, ratio), each `[N]`; logp, logp_old, advantages: `[N]`.

    The KL term (zeros unless beta > 0) is mean((mean - mean_ref)^2) / (2 kl_std^2) over latent elements, with
    mean, mean_ref `[N, ...]` and kl_std the SDE noise level std = a sqrt(sigma / (1 - sigma)) (float or `[N]`).
    """
    ratio = torch.exp(logp.float() - logp_old.float())
    adv = advantages.float()
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = torch.zeros_like(policy)
    if beta > 0:
        if mean is None or mean_ref is None or kl_std is None:
            raise ValueError("beta > 0 needs mean, mean_ref and kl_std for the KL term")
        std = _per_sample(kl_std, mean)
        kl = _sample_mean((mean.float() - mean_ref.float()).square()) / (2 * std.flatten() ** 2)
    return policy, kl, ratio


def clipped_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mean: torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    kl_std: torch.Tensor | float | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of a batch of (sample, step) items: the mean of `clipped_loss_terms`.
    Returns (loss, stats) with stats policy_loss, kl, clipfrac (detached)."""
    policy, kl, ratio = clipped_loss_terms(logp, logp_old, advantages, clip_range, mean, mean_ref, kl_std, beta)
    stats = {
        "policy_loss": policy.mean().detach(),
        "kl": kl.mean().detach(),
        "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
    }
    return policy.mean() + beta * kl.mean(), stats


# ----------------------------------------------------------------------------------------------------------------------
# Flow-GRPO in the training loop (fdfo/phases.py runs the shared sampling, exchange and optimizer loops).

NEEDS_X0 = False  # whether item_loss reads the sample's final latent
WHOLE_TRAJECTORIES = True  # §11: each optimizer step trains all trained steps of its samples (fdfo.phases.item_steps)
ITEM_KEYS = ("state", "next", "logp_old")


def trained_steps(num_steps: int) -> int:
    """docs/algorithm.md §11: int(0.99 T) of the T steps are trained (all but one for T <= 100): Flow-GRPO's steps
    j = 0 ... int(0.99 T) - 1, DiffusionNFT's int(0.99 T) random timesteps per sample."""
    return max(1, int(0.99 * num_steps))


@torch.no_grad()
def rollout(policy, x1: torch.Tensor, cond: dict, sigmas: torch.Tensor, noise, cfg) -> tuple[torch.Tensor, dict]:
    """SDE trajectories from x1 `[b, ...]`; `noise()` returns fresh `[b, ...]` noise per step.

    Returns (final latent `[b, ...]`, per-item tensors `[b, K, ...]`: state x_j, next x_{j+1} and logp_old of the
    trained steps j < K, all float32, plus timestep `[b, K]`, the index j)."""
    x = x1.float()
    num_steps, k_trained = len(sigmas) - 1, trained_steps(len(sigmas) - 1)
    kept = {key: [] for key in ITEM_KEYS}
    for k in range(num_steps):
        v = policy.velocity(x, sigmas[k].expand(len(x)), cond)
        x_next, mean, step_std = sde_step(x, v, sigmas[k], sigmas[k + 1], noise(), cfg.baseline.noise_level,
                                          sigmas[1])
        if k < k_trained:
            kept["state"].append(x)
            kept["next"].append(x_next)
            kept["logp_old"].append(step_log_prob(x_next, mean, step_std))
        x = x_next
    items = {key: torch.stack(value, dim=1) for key, value in kept.items()}
    items["timestep"] = torch.arange(k_trained, device=x.device).expand(len(x), -1)
    return x, items


def sample_weights(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-sample advantage A `[B]` from all ranks' finite rewards `[B]` and prompt ids `[B]`."""
    return group_advantages(rewards, groups)


def kept_samples(weights: torch.Tensor) -> torch.Tensor:
    """docs/algorithm.md §11: a sample whose advantage is 0 at every step (a group of equal rewards, a non-finite
    reward) is left out of the loss mean, as the authors filter such samples before training. `[B]` -> bool `[B]`."""
    return weights != 0


# docs/algorithm.md §11: CFG in the loss, v = sg(v_u) + g (v_c - sg(v_u)): only g dv_c reaches the LoRA.
def guided_velocity(policy, x: torch.Tensor, sigma: torch.Tensor, cond: dict, module=None) -> torch.Tensor:
    """The policy's CFG velocity `[B, ...]` (float32) with the unconditional half detached: the sampler's own call
    (one batched forward of [unconditional; conditional], the combination in the same dtype), so theta == old gives
    the sampler's velocity bit for bit, under autocast too."""
    if not getattr(policy, "cfg", False):  # nothing to detach (and velocity fields without CFG need not know the flag)
        return policy.velocity(x, sigma, cond, module=module)
    return policy.velocity(x, sigma, cond, module=module, detach_uncond=True)


def item_loss(policy, module, batch: dict, sigmas: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """Per-item clipped loss with KL `[n]` of a micro-batch, and per-item stats policy_loss, kl, clipfrac `[n]`;
    batch: state, next, logp_old, timestep, weight (the sample's advantage), cond."""
    a, j = cfg.baseline.noise_level, batch["timestep"]
    sigma, sigma_next = sigmas[j], sigmas[j + 1]
    x = batch["state"]
    v = guided_velocity(policy, x, sigma, batch["cond"], module=module)
    _, mean, step_std = sde_step(x, v, sigma, sigma_next, torch.zeros_like(x), a, sigmas[1])
    mean_ref = None
    if cfg.train.kl_weight > 0:
        v_ref = policy.base_velocity(x, sigma, batch["cond"])
        _, mean_ref, _ = sde_step(x, v_ref, sigma, sigma_next, torch.zeros_like(x), a, sigmas[1])
    logp = step_log_prob(batch["next"], mean, step_std)
    kl_std = sde_noise_level(sigma, a, sigmas[1]).to(x.device)
    policy_term, kl, ratio = clipped_loss_terms(logp, batch["logp_old"], batch["weight"], cfg.train.clip_range,
                                                mean, mean_ref, kl_std, cfg.train.kl_weight)
    clipped = ((ratio - 1).abs() > cfg.train.clip_range).float()
    return policy_term + cfg.train.kl_weight * kl, {"policy_loss": policy_term.detach(), "kl": kl.detach(),
                                                    "clipfrac": clipped}
