"""The phases of one FDFO epoch (docs/algorithm.md §5): sample pairs, build the shuffled training items, train.

Randomness is keyed by global pair index (seed, epoch, pair, branch), and the split of items into optimizer steps
is global, so the result does not depend on how many ranks share the work.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import tqdm

from fdfo import distributed as dist
from fdfo.config import Config, Geometry
from fdfo.cuda_graphs import GraphedMicroBatch
from fdfo.diagnostics import epoch_diagnostics, pair_mean_square, ratio_deviation
from fdfo.errors import RunError
from fdfo.objective import clip_fraction, pair_targets, spo_loss, spo_loss_velocity_region
from fdfo.rng import generator, randn_per_sample
from fdfo.safety import check_step
from fdfo.sampling import CHURN_DRAWS, make_churn, sample_pairs
from fdfo.scoring import batch_scorer, nonfinite_report

NOISE_STREAM, SHUFFLE_STREAM = 1, 2
TIMESTEP_STREAM = 0x4B54  # --train.timesteps-per-sample draws; far from the small stream numbers used elsewhere


@dataclass
class EpochSamples:
    """One rank's rollouts, interleaved a0, b0, ...: B = 2 * pairs_per_gpu samples, P = pairs_per_gpu prompts."""

    states: torch.Tensor | None  # [B, K, C, h, w] in the network's input dtype; None once handed to build_training_set
    velocities: torch.Tensor | None  # [B, K, C, h, w] (see rollout_dtypes)
    sigmas: torch.Tensor  # [T]
    final: torch.Tensor  # [B, C, h, w]
    rewards: dict[str, torch.Tensor]  # name -> [B]; "reward" is the weighted total
    cond: dict[str, torch.Tensor]  # name -> [P, ...]
    prompts: list[str]  # [P]
    preview: torch.Tensor  # [2 * n, 3, H, W] images of the first n pairs, on CPU
    timesteps: torch.Tensor | None = None  # [B, K] indices into sigmas of the kept states; None: all T (K = T)


def timesteps_per_sample(cfg: Config) -> int:
    """K of --train.timesteps-per-sample (default all T timesteps, as in the paper); ValueError if out of range."""
    num_steps, k = cfg.sample.num_solver_steps, cfg.train.timesteps_per_sample
    if k is None:
        return num_steps
    if not 1 <= k <= num_steps:
        raise ValueError(f"--train.timesteps-per-sample {k} must be between 1 and --sample.num-solver-steps "
                         f"{num_steps}")
    return k


def kept_timesteps(cfg: Config, epoch: int, pair: int) -> torch.Tensor:
    """`[2, K]` sorted timestep indices trained for the two samples of global pair `pair`, drawn from
    (seed, epoch, pair) before sampling, so they do not depend on ranks or batches; all T when K = T."""
    num_steps, k = cfg.sample.num_solver_steps, timesteps_per_sample(cfg)
    if k == num_steps:
        return torch.arange(num_steps).expand(2, -1)
    g = generator("cpu", cfg.seed, TIMESTEP_STREAM, epoch, pair)
    return torch.stack([torch.randperm(num_steps, generator=g)[:k].sort().values for _ in (0, 1)])


def rollout_dtypes(policy) -> tuple[torch.dtype, tuple[torch.dtype, ...]]:
    """How rollouts are stored: states in the dtype the network's first layer computes in, velocities in the first
    lossless 16-bit candidate.

    States: `policy.input_dtype` (fp16 under the default fp16 autocast, bf16 under bf16 autocast, else the model's
    dtype). The network only ever sees `x.to(policy.input_dtype)` (fdfo/models/), which is also what autocast makes of
    the authors' fp32 state, so storing that cast changes nothing in training, and training sees what theirs sees.
    A velocity is the network output cast to float32 (with CFG, under autocast, a combination computed in the output
    dtype): it is kept in 16 bits only when that round-trips exactly (`_lossless`), so training sees bit-identical
    values either way.
    """
    model_dtype = getattr(policy, "dtype", torch.float32)
    state_dtype = getattr(policy, "amp_dtype", None) or model_dtype  # the policy's input_dtype, for any policy object
    candidates = tuple(dt for dt in (getattr(policy, "amp_dtype", None), model_dtype)
                       if dt is not None and dt.itemsize < 4)
    return state_dtype, candidates


def _lossless(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """`x` in the first of `dtypes` that holds every value exactly, else unchanged."""
    for dtype in dtypes:
        y = x.to(dtype)
        if torch.equal(y.float(), x.float()):
            return y
    return x


def rollout_gb_per_rank(geom: Geometry, num_timesteps: int, latent_shape: tuple[int, ...], state_bytes: int,
                        velocity_bytes: int) -> float:
    """Rollout memory each rank holds for training (its own items: states + velocities), in GB (1e9 bytes)."""
    items = 2 * geom.pairs_per_gpu * num_timesteps
    return items * math.prod(latent_shape) * (state_bytes + velocity_bytes) / 1e9


def check_rollout_memory(cfg: Config, geom: Geometry, device: torch.device) -> None:
    """Refuse, before any model loads, an FDFO geometry whose rollouts cannot fit where they are kept (the training
    device, or host memory with --train.rollout-device cpu). The estimate is a lower bound: 16-channel latents (SD3,
    FLUX) at 1/8 of the resolution, 2 bytes per state and per velocity (the run's own line, printed once the model is
    loaded, counts the real dtypes)."""
    if cfg.algorithm != "fdfo":
        return
    side = cfg.sample.resolution // 8
    k = timesteps_per_sample(cfg)
    gb = rollout_gb_per_rank(geom, k, (16, side, side), 2, 2)
    host = cfg.train.rollout_device == "cpu" or device.type != "cuda"
    if host:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks of this node share its host memory
        need, have = gb * per_node, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        where = "host memory" + (f" ({per_node} ranks on this node)" if per_node > 1 else "")
    else:
        need, have = gb, torch.cuda.get_device_properties(device).total_memory / 1e9
        where = f"{device}'s memory"
    if need > have:
        raise ValueError(
            f"--total-pairs-per-epoch {cfg.total_pairs_per_epoch}: the epoch's rollouts need at least {need:,.0f} GB "
            f"({gb:,.3g} GB per rank: {2 * geom.pairs_per_gpu:,} samples x {k} timesteps x 16x{side}x{side} "
            f"latents x 4 bytes), more than the {have:,.0f} GB of {where}. Lower --total-pairs-per-epoch, "
            f"--train.timesteps-per-sample or --sample.resolution, or use more GPUs"
            + ("" if host else ", or keep them in host memory with --train.rollout-device cpu"))


def cat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sampling_batches(prompts: list[str], geom: Geometry, epoch: int):
    """(start, the batch's prompts) over this rank's prompts in sampling batches, with the epoch's progress bar."""
    for start in tqdm.trange(0, len(prompts), geom.sample_batch, desc=f"epoch {epoch} sample", leave=False,
                             disable=dist.get_rank() != 0):
        yield start, prompts[start:start + geom.sample_batch]


def sample_phase(policy, reward, cfg: Config, geom: Geometry, epoch: int, prompts: list[str],
                 first_pair: int) -> EpochSamples:
    """Sample `geom.pairs_per_gpu` pairs for global pairs first_pair.. of this epoch, decode and score them (with
    --reward.overlap-preprocessing, a batch's reward preprocessing runs while the next is sampled: fdfo/scoring.py)."""
    device, sigmas = policy.device, policy.sigmas(cfg.sample.num_solver_steps, cfg.sample.resolution)
    shape = policy.latent_shape(cfg.sample.resolution)
    churn = make_churn(cfg.sample.churn_schedule, cfg.sample.churn_weight)
    state_dtype, vel_dtypes = rollout_dtypes(policy)
    rollout_device = torch.device("cpu") if cfg.train.rollout_device == "cpu" else device
    batches = []
    with batch_scorer(reward, device, cfg.reward.overlap_preprocessing) as scorer:
        for start, batch_prompts in sampling_batches(prompts, geom, epoch):
            pairs = range(first_pair + start, first_pair + start + len(batch_prompts))
            x1 = randn_per_sample([generator(device, cfg.seed, NOISE_STREAM, epoch, i, 0) for i in pairs], shape,
                                  device)
            branch_gens = [generator(device, cfg.seed, NOISE_STREAM, epoch, i, 1 + b) for i in pairs for b in (0, 1)]
            z = torch.stack([torch.randn(CHURN_DRAWS, generator=generator(device, cfg.seed, NOISE_STREAM, epoch, i, 3),
                                         device=device) for i in pairs])  # [P, CHURN_DRAWS]: one schedule per pair
            cond = policy.encode(batch_prompts)
            traj = sample_pairs(policy.velocity, x1, {k: v.repeat_interleave(2, 0) for k, v in cond.items()}, sigmas,
                                churn, lambda k: randn_per_sample(branch_gens, shape, device), z)
            scorer.flush()  # --reward.overlap-preprocessing: the previous batch's model forwards, prepared meanwhile
            images = policy.decode(traj.final, cfg.sample.decode_batch_size)
            kept = 2 * cfg.image_log_pairs - 2 * start  # keep only the preview images; the rest are done with
            timesteps = torch.cat([kept_timesteps(cfg, epoch, i) for i in pairs])  # [2 P, K]
            states, velocities = traj.states, traj.velocities
            if timesteps.shape[1] < states.shape[1]:  # --train.timesteps-per-sample K < T: store only those K
                rows, cols = torch.arange(len(timesteps), device=device)[:, None], timesteps.to(device)
                states, velocities = states[rows, cols], velocities[rows, cols]
            batches.append(dict(states=states.to(rollout_device, state_dtype),
                                velocities=_lossless(velocities, vel_dtypes).to(rollout_device),
                                timesteps=timesteps,
                                final=traj.final, cond=cond,
                                images=images[:max(kept, 0)].cpu()))
            scorer.submit([p for p in batch_prompts for _ in (0, 1)], images, batches[-1])  # sets its "rewards"
        scorer.flush()
    return EpochSamples(
        states=torch.cat([b["states"] for b in batches]),
        velocities=torch.cat([b["velocities"] for b in batches]),
        sigmas=sigmas[:-1].float(),
        final=torch.cat([b["final"] for b in batches]),
        rewards=cat_rows([b["rewards"] for b in batches]),
        cond=cat_rows([b["cond"] for b in batches]),
        prompts=prompts,
        preview=torch.cat([b["images"] for b in batches]),
        timesteps=torch.cat([b["timesteps"] for b in batches]),
    )


@dataclass
class TrainingSet:
    """This rank's training items only (about 1/W of the epoch), in the order it trains them.

    Item id = global sample * K + j (timestep `EpochSamples.timesteps[sample, j]`; K = T and j = the timestep by
    default), samples in the rank-ordered interleaved order of all ranks. Row i of
    `states` / `velocities` is item `items[i]`; `sample` / `prompt` index the per-sample / per-prompt tensors, which
    hold only the samples and prompts this rank trains on. `steps[j]` holds the rows of optimizer step j, on the device.
    """

    items: torch.Tensor  # [N] global item ids (CPU), for inspection and tests
    states: torch.Tensor  # [N, C, h, w] in the network's input dtype, on the device (or --train.rollout-device)
    velocities: torch.Tensor  # [N, C, h, w]
    sigmas: torch.Tensor  # [T]
    timestep: torch.Tensor  # [N] index into sigmas
    sample: torch.Tensor  # [N] row of dx / dR
    prompt: torch.Tensor  # [N] row of every cond tensor
    dx: torch.Tensor  # [S, C, h, w]
    dR: torch.Tensor  # [S]
    cond: dict[str, torch.Tensor]  # [Q, ...]
    steps: list[torch.Tensor]
    invalid_pairs: int
    # diagnostics (fdfo/diagnostics.py), never read by training: mean(delta^2) of the epoch's valid pairs (all ranks)
    # `[P_valid]`; |rho - 1| / eps of each row once trained `[N]`; whether the pair of each row of every rank is valid,
    # in the rank order of a gather of ratio_dev `[W * N]` (CPU)
    pair_msq: torch.Tensor | None = None
    ratio_dev: torch.Tensor | None = None
    gathered_valid: torch.Tensor | None = None


def item_steps(num_items: int, cfg: Config, geom: Geometry, epoch: int, rank: int,
               trajectory: int = 1) -> list[torch.Tensor]:
    """Global item ids of optimizer step j for `rank`: one permutation seeded by (seed, epoch) (§5.2), each step's
    slice split evenly over the ranks, so step j trains the same items whatever the world size.

    trajectory > 1 (Flow-GRPO, §11): the ids come in runs of `trajectory` (a sample's trained steps) and every step
    trains whole runs: the runs are permuted, split into the steps, then each step's items are permuted."""
    gen = generator("cpu", cfg.seed, SHUFFLE_STREAM, epoch)
    if trajectory == 1:
        perm = torch.randperm(num_items, generator=gen)
    else:
        runs = torch.randperm(num_items // trajectory, generator=gen)
        ids = (runs[:, None] * trajectory + torch.arange(trajectory)).reshape(geom.gradient_steps, -1)
        perm = torch.cat([row[torch.randperm(len(row), generator=gen)] for row in ids])
    per_step = num_items // geom.gradient_steps
    per_rank = per_step // geom.world_size
    return [perm[j * per_step + rank * per_rank: j * per_step + (rank + 1) * per_rank]
            for j in range(geom.gradient_steps)]


def build_training_set(samples: EpochSamples, cfg: Config, geom: Geometry, epoch: int) -> TrainingSet:
    """FD targets per sample (§3), then each rank receives only the items it trains on (one all_to_all per tensor).

    Frees the sampling-time states and velocities of `samples` (set to None): after this call each rank holds its
    own items only, about 1/W of the epoch.
    """
    rewards = samples.rewards["reward"]
    valid = torch.isfinite(rewards).reshape(-1, 2).all(dim=1).repeat_interleave(2)
    dR, dx = pair_targets(torch.where(valid, rewards, 0.0), samples.final)
    # A pair with a non-finite reward is dropped: zero dR and dx make its loss and gradient exactly zero.
    dR = torch.where(valid, dR, 0.0)
    dx = dx * valid.reshape(-1, *([1] * (dx.ndim - 1)))
    valid_all = dist.all_gather_cat(valid.float())
    num_valid = int(valid_all.sum().item()) // 2
    num_pairs = len(valid_all) // 2
    if num_valid == 0:
        raise RunError(f"epoch {epoch}: all {num_pairs} pairs got a non-finite reward; "
                       f"{nonfinite_report(samples.rewards, cfg.reward_preset, cfg.reward)}")
    # K states per sample (all T by default); item = sample * K + j trains timestep timesteps[sample, j]
    num_timesteps = samples.states.shape[1]
    timesteps = samples.timesteps
    if timesteps is None:
        timesteps = torch.arange(num_timesteps).expand(len(dR), -1)
    num_items = 2 * num_pairs * num_timesteps
    rank, device = dist.get_rank(), dR.device
    per_rank = [torch.cat(item_steps(num_items, cfg, geom, epoch, r)) for r in range(geom.world_size)]
    per_rank_samples = [torch.unique(w // num_timesteps) for w in per_rank]  # sorted
    per_rank_prompts = [torch.unique(s // 2) for s in per_rank_samples]
    items = per_rank[rank]
    states = dist.exchange_rows(samples.states.flatten(0, 1), per_rank)
    samples.states = None  # free the sampling-time copy before the next exchange and training
    velocities = dist.exchange_rows(samples.velocities.flatten(0, 1), per_rank)
    samples.velocities = None
    own_samples, own_prompts = per_rank_samples[rank], per_rank_prompts[rank]
    sample = torch.searchsorted(own_samples, items // num_timesteps)
    prompt = torch.searchsorted(own_prompts, own_samples // 2)[sample]
    count = len(items) // geom.gradient_steps
    valid_pair = valid_all.reshape(-1, 2)[:, 0].bool()
    return TrainingSet(
        items=items, states=states, velocities=velocities, sigmas=samples.sigmas,
        timestep=dist.exchange_rows(timesteps.to(device), per_rank_samples)[sample.to(device),
                                                                             (items % num_timesteps).to(device)],
        sample=sample.to(device), prompt=prompt.to(device),
        dx=dist.exchange_rows(dx, per_rank_samples), dR=dist.exchange_rows(dR, per_rank_samples),
        cond={k: dist.exchange_rows(v, per_rank_prompts) for k, v in samples.cond.items()},
        steps=[torch.arange(j * count, (j + 1) * count, device=device) for j in range(geom.gradient_steps)],
        invalid_pairs=num_pairs - num_valid,
        pair_msq=dist.all_gather_cat(pair_mean_square(samples.final))[valid_pair.to(samples.final.device)].cpu(),
        ratio_dev=torch.full((len(items),), float("nan"), device=device),
        gathered_valid=valid_all.bool().cpu()[torch.cat(per_rank) // num_timesteps])


def training_diagnostics(data: TrainingSet) -> dict[str, float]:
    """The epoch's branch-separation and trust-region statistics over all ranks (valid pairs, their trained items);
    every rank must call it (it gathers)."""
    return epoch_diagnostics(data.pair_msq, dist.all_gather_cat(data.ratio_dev).cpu()[data.gathered_valid])


def train_phase(policy, module, optimizer, scaler, data, cfg: Config, geom: Geometry,
                epoch: int, logger, global_step: int, micro_batch=None, after_step=None) -> tuple[int, list[dict]]:
    """Optimizer steps over the prepared items; gradients sync across ranks only on the last micro-batch.

    micro_batch: forward + backward of one micro-batch (default FDFO's; `baseline_micro_batch` for the baselines);
    after_step(): called after each optimizer step (DiffusionNFT's EMA)."""
    micro_batch = micro_batch or _micro_batch
    if cfg.train.cuda_graphs:  # captured on CUDA; elsewhere (tests) the same static-buffer path without a graph
        micro_batch = GraphedMicroBatch(micro_batch, capture=policy.device.type == "cuda")
    params = policy.trainable_parameters()
    records = []
    for step_items in tqdm.tqdm(data.steps, desc=f"epoch {epoch} train", leave=False, disable=dist.get_rank() != 0):
        micro = step_items.split(geom.train_batch)
        sums = torch.zeros(4, dtype=torch.float64, device=policy.device)  # loss, policy loss, clipped, kl
        for m, ids in enumerate(micro):
            sync = m == len(micro) - 1 or not hasattr(module, "no_sync")
            with contextlib.nullcontext() if sync else module.no_sync():
                sums += micro_batch(policy, module, scaler, data, ids, cfg, len(step_items))
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        dist.all_reduce_mean_(sums)
        n = len(step_items)
        # stop before a non-finite update (fdfo/safety.py); an fp16 overflow is a step the scaler skips
        check_step(float(sums[0] / n), float(grad_norm), scaler.is_enabled(), epoch, global_step + 1, scaler.get_scale)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=not cfg.train.cuda_graphs)  # a captured backward adds into the same tensors
        if after_step is not None:
            after_step()
        global_step += 1
        record = dict(epoch=epoch, step=global_step, loss=sums[0] / n, policy_loss=sums[1] / n,
                      clipfrac=sums[2] / n, kl=sums[3] / n, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"])
        record = {k: float(v) for k, v in record.items()} | dict(epoch=epoch, step=global_step)
        logger.log(record)
        records.append(record)
    return global_step, records


def _micro_batch(policy, module, scaler, data: TrainingSet, ids: torch.Tensor, cfg: Config,
                 step_size: int) -> torch.Tensor:
    """Forward + backward of one micro-batch (`ids`: rows of `data`, on the device, so indexing never syncs with the
    host); the loss is scaled so a step's gradient is the mean over its items."""
    sample = data.sample[ids]
    cond = {key: value[data.prompt[ids]] for key, value in data.cond.items()}
    rows = ids.to(data.states.device)  # a no-op unless the rollouts live in host memory (--train.rollout-device cpu)
    x = data.states[rows].to(policy.device, non_blocking=True)
    v_ref = data.velocities[rows].to(policy.device, non_blocking=True).float()
    sigma = data.sigmas[data.timestep[ids]]
    v = policy.velocity(x, sigma, cond, module=module)
    objective = spo_loss_velocity_region if cfg.train.trust_region == "velocity" else spo_loss
    policy_loss, ratio = objective(v, v_ref, data.dx[sample], data.dR[sample], cfg.train.clip_range)
    kl = torch.zeros_like(policy_loss)
    if cfg.train.kl_weight > 0:
        v_base = policy.base_velocity(x, sigma, cond)
        kl = (v - v_base).square().flatten(1).mean(dim=1)
    loss = policy_loss + cfg.train.kl_weight * kl
    scaler.scale(loss.sum() / step_size).backward()
    clipped = clip_fraction(ratio, cfg.train.clip_range) * len(ids)
    if data.ratio_dev is not None:
        data.ratio_dev[ids] = ratio_deviation(ratio, cfg.train.clip_range)
    return torch.stack([loss.sum(), policy_loss.sum(), clipped, kl.sum()]).detach().double()


# ----------------------------------------------------------------------------------------------------------------------
