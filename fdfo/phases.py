"""The phases of one FDFO epoch (ALGORITHM.md §5): sample pairs, build the shuffled training items, train.

Randomness is keyed by global pair index (seed, epoch, pair, branch), and the split of items into optimizer steps
is global, so the result does not depend on how many ranks share the work.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import tqdm

from fdfo import distributed as dist
from fdfo.cli import RunError
from fdfo.config import Config, Geometry
from fdfo.objective import clip_fraction, pair_targets, spo_loss
from fdfo.rng import generator, randn_per_sample
from fdfo.safety import check_step
from fdfo.sampling import CHURN_DRAWS, make_churn, sample_pairs

NOISE_STREAM, SHUFFLE_STREAM = 1, 2


@dataclass
class EpochSamples:
    """One rank's rollouts, interleaved a0, b0, ...: B = 2 * pairs_per_gpu samples, P = pairs_per_gpu prompts."""

    states: torch.Tensor  # [B, T, C, h, w]
    velocities: torch.Tensor  # [B, T, C, h, w]
    sigmas: torch.Tensor  # [T]
    final: torch.Tensor  # [B, C, h, w]
    rewards: dict[str, torch.Tensor]  # name -> [B]; "reward" is the weighted total
    cond: dict[str, torch.Tensor]  # name -> [P, ...]
    prompts: list[str]  # [P]
    preview: torch.Tensor  # [2 * n, 3, H, W] images of the first n pairs, on CPU


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sample_phase(policy, reward, cfg: Config, geom: Geometry, epoch: int, prompts: list[str],
                 first_pair: int) -> EpochSamples:
    """Sample `geom.pairs_per_gpu` pairs for global pairs first_pair.. of this epoch, decode and score them."""
    device, sigmas = policy.device, policy.sigmas(cfg.sample.num_solver_steps)
    shape = policy.latent_shape(cfg.sample.resolution)
    churn = make_churn(cfg.sample.churn_schedule, cfg.sample.churn_weight)
    batches = []
    for start in tqdm.trange(0, len(prompts), geom.sample_batch, desc=f"epoch {epoch} sample", leave=False,
                             disable=dist.get_rank() != 0):
        batch_prompts = prompts[start:start + geom.sample_batch]
        pairs = range(first_pair + start, first_pair + start + len(batch_prompts))
        x1 = randn_per_sample([generator(device, cfg.seed, NOISE_STREAM, epoch, i, 0) for i in pairs], shape, device)
        branch_gens = [generator(device, cfg.seed, NOISE_STREAM, epoch, i, 1 + b) for i in pairs for b in (0, 1)]
        z = torch.stack([torch.randn(CHURN_DRAWS, generator=generator(device, cfg.seed, NOISE_STREAM, epoch, i, 3),
                                     device=device) for i in pairs])  # [P, CHURN_DRAWS]: one schedule per pair
        cond = policy.encode(batch_prompts)
        traj = sample_pairs(policy.velocity, x1, {k: v.repeat_interleave(2, 0) for k, v in cond.items()}, sigmas,
                            churn, lambda k: randn_per_sample(branch_gens, shape, device), z)
        images = policy.decode(traj.final)
        scores = reward.components([p for p in batch_prompts for _ in (0, 1)], images)
        kept = 2 * cfg.image_log_pairs - 2 * start  # keep only the preview images; the rest are done with
        batches.append(dict(states=traj.states, velocities=traj.velocities, final=traj.final, cond=cond,
                            rewards={k: v.float().to(device) for k, v in scores.items()},
                            images=images[:max(kept, 0)].cpu()))
    return EpochSamples(
        states=torch.cat([b["states"] for b in batches]),
        velocities=torch.cat([b["velocities"] for b in batches]),
        sigmas=sigmas[:-1].float(),
        final=torch.cat([b["final"] for b in batches]),
        rewards=_cat([b["rewards"] for b in batches]),
        cond=_cat([b["cond"] for b in batches]),
        prompts=prompts,
        preview=torch.cat([b["images"] for b in batches]),
    )


@dataclass
class TrainingSet:
    """All ranks' items, gathered; `steps[j]` holds this rank's item ids for optimizer step j.

    Item id = sample * T + timestep, sample in the gathered interleaved order. Per-sample data stays compact.
    """

    states: torch.Tensor  # [B_all, T, ...]
    velocities: torch.Tensor  # [B_all, T, ...]
    sigmas: torch.Tensor  # [T]
    dx: torch.Tensor  # [B_all, ...]
    dR: torch.Tensor  # [B_all]
    cond: dict[str, torch.Tensor]  # [P_all, ...]
    steps: list[torch.Tensor]
    invalid_pairs: int


def build_training_set(samples: EpochSamples, cfg: Config, geom: Geometry, epoch: int) -> TrainingSet:
    """FD targets per sample (§3), gather over ranks, one global permutation seeded by (seed, epoch) (§5.2)."""
    rewards = samples.rewards["reward"]
    valid = torch.isfinite(rewards).reshape(-1, 2).all(dim=1).repeat_interleave(2)
    dR, dx = pair_targets(torch.where(valid, rewards, 0.0), samples.final)
    # A pair with a non-finite reward is dropped: zero dR and dx make its loss and gradient exactly zero.
    dR = torch.where(valid, dR, 0.0)
    dx = dx * valid.reshape(-1, *([1] * (dx.ndim - 1)))
    gathered = {k: dist.all_gather_cat(v) for k, v in
                dict(states=samples.states, velocities=samples.velocities, dx=dx, dR=dR,
                     valid=valid.float()).items()}
    cond = {k: dist.all_gather_cat(v) for k, v in samples.cond.items()}
    num_valid = int(gathered.pop("valid").sum().item()) // 2
    num_pairs = len(gathered["dR"]) // 2
    if num_valid == 0:
        raise RunError(f"epoch {epoch}: all {num_pairs} pairs got a non-finite reward; check the reward model "
                           f"(--reward-preset {cfg.reward_preset}) and the sampled images")
    num_steps = len(samples.sigmas)
    num_items = len(gathered["dR"]) * num_steps
    perm = torch.randperm(num_items, generator=generator("cpu", cfg.seed, SHUFFLE_STREAM, epoch))
    per_step = num_items // geom.gradient_steps
    per_rank = per_step // geom.world_size
    rank = dist.get_rank()
    steps = [perm[j * per_step + rank * per_rank: j * per_step + (rank + 1) * per_rank]
             for j in range(geom.gradient_steps)]
    return TrainingSet(sigmas=samples.sigmas, cond=cond, steps=steps, invalid_pairs=num_pairs - num_valid, **gathered)


def train_phase(policy, module, optimizer, scaler, data: TrainingSet, cfg: Config, geom: Geometry,
                epoch: int, logger, global_step: int) -> tuple[int, list[dict]]:
    """Optimizer steps over the prepared items; gradients sync across ranks only on the last micro-batch."""
    num_timesteps = len(data.sigmas)
    params = policy.trainable_parameters()
    records = []
    for step_items in tqdm.tqdm(data.steps, desc=f"epoch {epoch} train", leave=False, disable=dist.get_rank() != 0):
        micro = step_items.split(geom.train_batch)
        sums = torch.zeros(4, dtype=torch.float64, device=policy.device)  # loss, policy loss, clipped, kl
        for m, ids in enumerate(micro):
            sync = m == len(micro) - 1 or not hasattr(module, "no_sync")
            with contextlib.nullcontext() if sync else module.no_sync():
                sums += _micro_batch(policy, module, scaler, data, ids.to(data.dR.device), num_timesteps, cfg,
                                     len(step_items))
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        dist.all_reduce_mean_(sums)
        n = len(step_items)
        # stop before a non-finite update (fdfo/safety.py); an fp16 overflow is a step the scaler skips
        check_step(float(sums[0] / n), float(grad_norm), scaler.is_enabled(), epoch, global_step + 1)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        record = dict(epoch=epoch, step=global_step, loss=sums[0] / n, policy_loss=sums[1] / n,
                      clipfrac=sums[2] / n, kl=sums[3] / n, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"])
        record = {k: float(v) for k, v in record.items()} | dict(epoch=epoch, step=global_step)
        logger.log(record)
        records.append(record)
    return global_step, records


def _micro_batch(policy, module, scaler, data: TrainingSet, ids: torch.Tensor, num_timesteps: int, cfg: Config,
                 step_size: int) -> torch.Tensor:
    """Forward + backward of one micro-batch; the loss is scaled so a step's gradient is the mean over its items."""
    sample, k = ids // num_timesteps, ids % num_timesteps
    cond = {key: value[sample // 2] for key, value in data.cond.items()}
    x, v_ref, sigma = data.states[sample, k], data.velocities[sample, k], data.sigmas[k]
    v = policy.velocity(x, sigma, cond, module=module)
    policy_loss, ratio = spo_loss(v, v_ref, data.dx[sample], data.dR[sample], cfg.train.clip_range)
    kl = torch.zeros_like(policy_loss)
    if cfg.train.kl_weight > 0:
        v_base = policy.base_velocity(x, sigma, cond)
        kl = (v - v_base).square().flatten(1).mean(dim=1)
    loss = policy_loss + cfg.train.kl_weight * kl
    scaler.scale(loss.sum() / step_size).backward()
    clipped = clip_fraction(ratio, cfg.train.clip_range) * len(ids)
    return torch.stack([loss.sum(), policy_loss.sum(), clipped, kl.sum()]).detach().double()
