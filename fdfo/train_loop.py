"""The FDFO training run: setup, then per epoch sample -> build items -> train -> log -> save (ALGORITHM.md §5)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.checkpoints import (checkpoint_dir, latest_checkpoint, new_run_dir, read_checkpoint, save_checkpoint,
                              write_json_atomic)
from fdfo.config import Config, Geometry, batch_geometry
from fdfo.phases import (EpochSamples, build_training_set, rollout_dtypes, rollout_gb_per_rank, sample_phase,
                         timesteps_per_sample, train_phase)
from fdfo.prompts import load_prompts, prompt_indices
from fdfo.rng import derive_seed
from fdfo.runlog import NullLogger, RunLogger
from fdfo.sd3 import SD3Policy

INIT_STREAM = 3
CHECKPOINT_FORMAT = 1
# config fields that may differ when a run is resumed without that being worth a note
RESUME_MAY_CHANGE = {"num_epochs", "resume_from", "run_dir", "log_wandb", "device", "geometry", "save_freq",
                     "image_log_freq"}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def prepare_run_dir(cfg: Config) -> Path:
    """Rank 0 creates (or reuses, for --run-dir) the run folder and tells the other ranks where it is."""
    path = None
    if dist.get_rank() == 0:
        if cfg.run_dir is not None:
            path = Path(cfg.run_dir)
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = new_run_dir("runs", cfg.run_name)
    return Path(dist.broadcast_object(str(path) if path else None))


def find_resume_point(cfg: Config) -> Path | None:
    """--resume-from, else the newest checkpoint of an existing --run-dir, else None (a fresh run)."""
    if cfg.resume_from is not None:
        return Path(cfg.resume_from)
    return latest_checkpoint(Path(cfg.run_dir)) if cfg.run_dir is not None else None


def build_policy(cfg: Config, device: torch.device) -> SD3Policy:
    # LoRA A matrices are drawn from the global RNG; seed it so every rank and every world size starts alike.
    torch.manual_seed(derive_seed(cfg.seed, INIT_STREAM))
    with dist.rank0_first():  # rank 0 builds or downloads into the shared cache first
        return SD3Policy(cfg.pretrained_model, device, cfg.lora_rank, cfg.lora_alpha, cfg.sample.guidance_scale,
                         amp_dtype(cfg.train.precision, device))


def rollout_memory_note(policy, cfg: Config, geom: Geometry) -> str:
    """One line: the rollout memory each rank holds for training (states and velocities of its own items)."""
    state_dtype, velocity_dtypes = rollout_dtypes(policy)
    state_bytes = torch.finfo(state_dtype).bits // 8
    # velocities are kept in 16 bits only when that is lossless, which CFG (a float32 combination) rules out
    velocity_bytes = 2 if velocity_dtypes and cfg.sample.guidance_scale == 1.0 else 4
    latent = policy.latent_shape(cfg.sample.resolution)
    k = timesteps_per_sample(cfg)
    gb = rollout_gb_per_rank(geom, k, latent, state_bytes, velocity_bytes)
    return (f"rollout memory per rank: {gb:.3g} GB ({2 * geom.pairs_per_gpu} samples x {k} timesteps x "
            f"{'x'.join(map(str, latent))} latents x ({state_bytes} + {velocity_bytes}) bytes)")


def build_reward_model(cfg: Config, device: torch.device):
    from rewards import build_reward

    with dist.rank0_first():
        return build_reward(cfg.reward_preset, cfg.reward, device)


def log_epoch(logger, samples: EpochSamples, data, epoch: int, times: dict, records: list[dict],
              cfg: Config, geom: Geometry) -> dict:
    """Epoch statistics over all ranks' rewards (finite ones), plus phase times."""
    record = dict(epoch=epoch, prompt_position=(epoch + 1) * geom.total_pairs, invalid_pairs=data.invalid_pairs)
    for name, values in samples.rewards.items():
        values = dist.all_gather_cat(values)
        values = values[torch.isfinite(values)]
        record[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
        record[f"{name}_std"] = float(values.std()) if len(values) > 1 else 0.0
    record["loss"] = sum(r["loss"] for r in records) / len(records)
    record["clipfrac"] = sum(r["clipfrac"] for r in records) / len(records)
    record |= {f"time_{k}": round(v, 3) for k, v in times.items()}
    logger.log(record)
    if cfg.image_log_freq > 0 and epoch % cfg.image_log_freq == 0:
        n = len(samples.preview) // 2
        logger.log_pairs(epoch, samples.preview, samples.prompts[:n], samples.rewards["reward"][: 2 * n])
    return record


@dataclass
class Run:
    """Everything an epoch needs, built once by `setup`."""

    cfg: Config
    geom: Geometry
    prompts: list[str]
    policy: SD3Policy
    reward: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    module: torch.nn.Module  # the network trained: the LoRA transformer, wrapped in DDP under torchrun
    run_dir: Path
    logger: NullLogger
    epoch: int  # epochs done
    global_step: int


def setup(cfg: Config) -> Run:
    """Check the user's input, load the models, restore a checkpoint if there is one, open the run folder and log."""
    device = dist.init(cfg.device)
    geom = batch_geometry(cfg, dist.get_world_size())  # user errors surface before any model loads
    timesteps_per_sample(cfg)
    prompts = load_prompts(cfg.prompt_file)
    dist.print0(geom.describe(cfg.total_pairs_per_epoch, cfg.sample.num_solver_steps))
    resume = find_resume_point(cfg)
    counters, state = read_checkpoint(resume) if resume is not None else ({"epoch": 0, "global_step": 0}, None)
    policy = build_policy(cfg, device)
    policy.speed_options(cfg.train.compile, cfg.train.gradient_checkpointing)
    dist.print0(rollout_memory_note(policy, cfg, geom))
    reward = build_reward_model(cfg, device)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.train.learning_rate, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.amp_dtype == torch.float16)
    if state is not None:
        policy.load_adapter(resume)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        dist.print0(f"resumed from {resume} (epoch {counters['epoch']}, step {counters['global_step']})")
    module = policy.transformer
    if dist.is_distributed():
        # find_unused_parameters: the LoRA on the last block's add_q_proj never gets a gradient (that block drops its
        # context output), and DDP's reducer would otherwise wait for it forever.
        module = torch.nn.parallel.DistributedDataParallel(
            policy.transformer, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)
    run_dir = prepare_run_dir(cfg)  # only now: a model that fails to load leaves no empty run folder behind
    return Run(cfg, geom, prompts, policy, reward, optimizer, scaler, module, run_dir, open_logger(cfg, geom, run_dir),
               counters["epoch"], counters["global_step"])


def open_logger(cfg: Config, geom: Geometry, run_dir: Path):
    """Rank 0 writes config.json (once: a resumed run keeps the original) and opens the log; others get a null one."""
    if dist.get_rank() != 0:
        return NullLogger()
    config = dataclasses.asdict(cfg) | {"geometry": dataclasses.asdict(geom), "run_dir": str(run_dir)}
    config = json.loads(json.dumps(config))  # as it reads back from the file (tuples become lists)
    path = run_dir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in config if k not in RESUME_MAY_CHANGE and saved.get(k) != config[k])
        if changed:
            print(f"note: resuming with settings that differ from {path}: {', '.join(changed)}", flush=True)
    else:
        write_json_atomic(path, config)
    return RunLogger(run_dir, config, cfg.log_wandb)


def run_epoch(run: Run) -> None:
    """sample -> build the shuffled items -> train -> log -> save; advances run.epoch."""
    cfg, geom, policy, epoch = run.cfg, run.geom, run.policy, run.epoch
    t0 = time.perf_counter()
    policy.offload_text_encoders(False)
    first_pair = dist.get_rank() * geom.pairs_per_gpu
    idx = prompt_indices(len(run.prompts), cfg.seed, epoch * geom.total_pairs + first_pair, geom.pairs_per_gpu)
    policy.transformer.eval()
    samples = sample_phase(policy, run.reward, cfg, geom, epoch, [run.prompts[i] for i in idx], first_pair)
    t1 = time.perf_counter()
    data = build_training_set(samples, cfg, geom, epoch)
    run.reward.offload()  # to CPU until the next sampling phase, with --reward.offload
    if cfg.offload_text_encoders:
        policy.offload_text_encoders(True)
    policy.transformer.train()
    run.global_step, records = train_phase(policy, run.module, run.optimizer, run.scaler, data, cfg, geom, epoch,
                                           run.logger, run.global_step)
    t2 = time.perf_counter()
    record = log_epoch(run.logger, samples, data, epoch, dict(sample=t1 - t0, train=t2 - t1, total=t2 - t0), records,
                       cfg, geom)
    dist.print0(f"epoch {epoch}: reward {record['reward_mean']:.4f} +- {record['reward_std']:.4f}, "
                f"loss {record['loss']:.4g}, clipfrac {record['clipfrac']:.3f}, {t2 - t0:.1f}s")
    run.epoch += 1
    if run.epoch % cfg.save_freq == 0 or run.epoch == cfg.num_epochs:
        save(run)


def train(cfg: Config) -> Path:
    """Run (or resume) training; returns the run folder."""
    run = setup(cfg)
    try:
        while run.epoch < cfg.num_epochs:
            run_epoch(run)
    finally:
        run.logger.close()
    return run.run_dir


def save(run: Run) -> None:
    """Rank 0 writes the checkpoint of the epochs done so far; the other ranks wait for it."""
    if dist.get_rank() == 0:
        cfg, epochs_done = run.cfg, run.epoch
        counters = dict(format=CHECKPOINT_FORMAT, epoch=epochs_done, global_step=run.global_step, seed=cfg.seed,
                        prompt_position=epochs_done * run.geom.total_pairs, world_size=run.geom.world_size,
                        guidance_scale=cfg.sample.guidance_scale, pretrained_model=cfg.pretrained_model)
        save_checkpoint(checkpoint_dir(run.run_dir, epochs_done), run.policy.save_adapter,
                        {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict()}, counters)
    dist.barrier()
