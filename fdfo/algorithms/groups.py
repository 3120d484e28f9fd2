"""The epoch phases of the group-based baselines (--algorithm flow_grpo / diffusion_nft, docs/algorithm.md §11):
G samples per prompt instead of a pair. What differs per method (its rollout, what it stores, its per-sample weight
and its loss) is in fdfo/algorithms/<name>.py; prompts, rewards, the global shuffle, the exchange and the optimizer
loop (`fdfo.phases.train_phase`) are FDFO's."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from fdfo import distributed as dist
from fdfo.config import Config, Geometry
from fdfo.errors import RunError
from fdfo.phases import cat_rows, item_steps, sampling_batches
from fdfo.rng import generator, randn_per_sample
from fdfo.scoring import batch_scorer, nonfinite_report

GROUP_STREAM = 0x4750  # per-sample noise of the baselines' rollouts (seed, epoch, prompt, sample in group)


def algorithm_module(name: str):
    from fdfo.algorithms import diffusion_nft, flow_grpo

    return {"flow_grpo": flow_grpo, "diffusion_nft": diffusion_nft}[name]


@dataclass
class GroupSamples:
    """One rank's rollouts, G consecutive samples per prompt: B = G * pairs_per_gpu samples, P = pairs_per_gpu."""

    items: dict[str, torch.Tensor] | None  # name -> [B, K, ...] (the method's ITEM_KEYS and timestep)
    sigmas: torch.Tensor  # [T + 1]
    final: torch.Tensor  # [B, C, h, w]
    rewards: dict[str, torch.Tensor]  # name -> [B]
    cond: dict[str, torch.Tensor]  # name -> [P, ...]
    prompts: list[str]  # [P]
    preview: torch.Tensor  # [2 n, 3, H, W]: the first two samples of the first n prompts


def sample_groups(policy, reward, cfg: Config, geom: Geometry, epoch: int, prompts: list[str],
                  first_pair: int) -> GroupSamples:
    """Sample G images for each of this rank's prompts (global prompt ids first_pair..) with the method's rollout,
    decode and score them. Randomness per sample is keyed by (seed, epoch, prompt, g): independent of ranks and
    batches."""
    algo, group = algorithm_module(cfg.algorithm), cfg.baseline.group_size
    device, sigmas = policy.device, policy.sigmas(cfg.sample.num_solver_steps, cfg.sample.resolution)
    shape = policy.latent_shape(cfg.sample.resolution)
    rollout_device = torch.device("cpu") if cfg.train.rollout_device == "cpu" else device
    batches = []
    with batch_scorer(reward, device, cfg.reward.overlap_preprocessing) as scorer:
        for start, batch_prompts in sampling_batches(prompts, geom, epoch):
            gens = [generator(device, cfg.seed, GROUP_STREAM, epoch, i, g)
                    for i in range(first_pair + start, first_pair + start + len(batch_prompts)) for g in range(group)]
            x1 = randn_per_sample(gens, shape, device)
            cond = policy.encode(batch_prompts)
            final, items = algo.rollout(policy, x1, {k: v.repeat_interleave(group, 0) for k, v in cond.items()},
                                        sigmas, lambda: randn_per_sample(gens, shape, device), cfg)
            scorer.flush()  # --reward.overlap-preprocessing: the previous batch's model forwards (see sample_phase)
            images = policy.decode(final, cfg.sample.decode_batch_size)
            shown = [i * group + g for i in range(min(len(batch_prompts), cfg.image_log_pairs - start)) for g in (0, 1)]
            items = {key: value.to(rollout_device) for key, value in items.items()}
            batches.append(dict(items=items, final=final, cond=cond, images=images[shown].cpu()))
            scorer.submit([p for p in batch_prompts for _ in range(group)], images, batches[-1])  # sets "rewards"
        scorer.flush()
    return GroupSamples(items=cat_rows([b["items"] for b in batches]), sigmas=sigmas.float(),
                        final=torch.cat([b["final"] for b in batches]),
                        rewards=cat_rows([b["rewards"] for b in batches]),
                        cond=cat_rows([b["cond"] for b in batches]), prompts=prompts,
                        preview=torch.cat([b["images"] for b in batches]))


@dataclass
class GroupItems:
    """This rank's training items of a baseline, in training order (as TrainingSet): item id = global sample * K + j.
    `rows` holds the per-item tensors, `per_sample` the per-sample ones (weight; x0 if the method's loss needs it),
    `cond` the prompts'."""

    items: torch.Tensor  # [N] global item ids (CPU)
    rows: dict[str, torch.Tensor]  # name -> [N, ...]
    sigmas: torch.Tensor  # [T + 1]
    sample: torch.Tensor  # [N] row of per_sample
    prompt: torch.Tensor  # [N] row of cond
    per_sample: dict[str, torch.Tensor]  # name -> [S, ...]
    cond: dict[str, torch.Tensor]  # name -> [Q, ...]
    steps: list[torch.Tensor]
    invalid_pairs: int  # samples with a non-finite reward (weight 0 for Flow-GRPO, r = 0.5 for DiffusionNFT)
    scale: torch.Tensor  # [N] loss weight of each item (item_scales)
    dropped: int  # samples left out of the loss mean (Flow-GRPO: advantage 0 at every step)


def prompt_keys(prompts: list[str]) -> torch.Tensor:
    """An int64 key per prompt text (the first 8 bytes of its SHA-256): equal texts, equal keys. `[P]`."""
    return torch.tensor([int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big", signed=True)
                         for p in prompts], dtype=torch.int64)


def group_weights(samples: GroupSamples, cfg: Config) -> tuple[torch.Tensor, int]:
    """ALL ranks' per-sample weights `[W B]` (Flow-GRPO's advantage, DiffusionNFT's optimality) from all ranks'
    rewards. Groups are keyed by prompt text, as the authors' per-prompt statistics: a prompt drawn twice in an epoch
    is one group. Samples with a non-finite reward are left out of the statistics and get a neutral weight (A = 0)."""
    algo, group = algorithm_module(cfg.algorithm), cfg.baseline.group_size
    rewards = dist.all_gather_cat(samples.rewards["reward"])
    valid = torch.isfinite(rewards)
    if not valid.any():
        raise RunError(f"all {len(rewards)} samples got a non-finite reward; "
                       f"{nonfinite_report(samples.rewards, cfg.reward_preset, cfg.reward)}")
    keys = dist.all_gather_cat(prompt_keys(samples.prompts).to(rewards.device)).repeat_interleave(group)
    groups = torch.unique(keys, return_inverse=True)[1]
    weights = torch.zeros_like(rewards) if cfg.algorithm == "flow_grpo" else torch.full_like(rewards, 0.5)
    weights[valid] = algo.sample_weights(rewards[valid], groups[valid])
    return weights, int((~valid).sum())


def item_scales(kept: torch.Tensor, per_rank: list[torch.Tensor], num_timesteps: int, steps: int,
                world_size: int) -> torch.Tensor:
    """This rank's per-item loss weights `[N]` (rank 0's list is per_rank[0], ...): each optimizer step's gradient is
    the mean over the step's kept items on all ranks (kept: bool `[W B]` per global sample). DDP averages the ranks'
    gradients, hence the factor W. An item of a dropped sample weighs 0."""
    rank = dist.get_rank()
    scales = []
    for items in per_rank:
        scales.append(kept[items // num_timesteps].float().reshape(steps, -1))
    total = torch.stack(scales).sum(dim=(0, 2))  # [steps] kept items per optimizer step, all ranks
    return (scales[rank] * world_size / total.clamp_min(1)[:, None]).flatten()


def build_group_items(samples: GroupSamples, cfg: Config, geom: Geometry, epoch: int) -> GroupItems:
    """Per-sample weights, then each rank receives only the items it trains on (as build_training_set)."""
    weights, invalid = group_weights(samples, cfg)
    n, rank = len(samples.final), dist.get_rank()
    weight = weights[rank * n:(rank + 1) * n]
    num_samples, num_timesteps = len(weight), samples.items["timestep"].shape[1]
    num_items = num_samples * geom.world_size * num_timesteps
    device = weight.device
    algo = algorithm_module(cfg.algorithm)
    trajectory = num_timesteps if algo.WHOLE_TRAJECTORIES else 1  # Flow-GRPO: a sample's items in one step
    per_rank = [torch.cat(item_steps(num_items, cfg, geom, epoch, r, trajectory)) for r in range(geom.world_size)]
    kept = algo.kept_samples(weights).cpu()
    scale = item_scales(kept, per_rank, num_timesteps, geom.gradient_steps, geom.world_size)
    per_rank_samples = [torch.unique(w // num_timesteps) for w in per_rank]
    per_rank_prompts = [torch.unique(s // cfg.baseline.group_size) for s in per_rank_samples]
    items = per_rank[rank]
    rows = {}
    for key in list(samples.items):
        rows[key] = dist.exchange_rows(samples.items.pop(key).flatten(0, 1), per_rank)
    samples.items = None
    own_samples, own_prompts = per_rank_samples[rank], per_rank_prompts[rank]
    sample = torch.searchsorted(own_samples, items // num_timesteps)
    prompt = torch.searchsorted(own_prompts, own_samples // cfg.baseline.group_size)[sample]
    count = len(items) // geom.gradient_steps
    per_sample = {"weight": weight}
    if algo.NEEDS_X0:
        per_sample["x0"] = samples.final.float()
    return GroupItems(
        items=items, rows=rows, sigmas=samples.sigmas, sample=sample.to(device), prompt=prompt.to(device),
        scale=scale.to(device), dropped=int((~kept).sum()),
        per_sample={k: dist.exchange_rows(v, per_rank_samples) for k, v in per_sample.items()},
        cond={k: dist.exchange_rows(v, per_rank_prompts) for k, v in samples.cond.items()},
        steps=[torch.arange(j * count, (j + 1) * count, device=device) for j in range(geom.gradient_steps)],
        invalid_pairs=invalid)


def baseline_micro_batch(policy, module, scaler, data: GroupItems, ids: torch.Tensor, cfg: Config,
                         step_size: int) -> torch.Tensor:
    """Forward + backward of one micro-batch of a baseline: the method's per-item `item_loss`, weighted by
    `data.scale` so that a step's gradient is the mean over its kept items (all ranks). Returns the sums over the
    micro-batch's items of loss, policy loss, clipped and KL (for the log: means over all items)."""
    sample = data.sample[ids]
    rows = ids.to(data.rows["timestep"].device)  # a no-op unless the rollouts live in host memory
    batch = {key: value[rows].to(policy.device, non_blocking=True) for key, value in data.rows.items()}
    batch |= {key: value[sample] for key, value in data.per_sample.items()}
    batch["cond"] = {key: value[data.prompt[ids]] for key, value in data.cond.items()}
    loss, stats = algorithm_module(cfg.algorithm).item_loss(policy, module, batch, data.sigmas, cfg)
    scaler.scale((loss * data.scale[ids]).sum()).backward()
    return torch.stack([loss.detach().sum(), stats["policy_loss"].sum(), stats["clipfrac"].sum(),
                        stats["kl"].sum()]).double()
