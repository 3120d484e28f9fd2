"""The FDFO training run: setup, then per epoch sample -> build items -> train -> log -> save (ALGORITHM.md §5)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.checkpoints import (checkpoint_dir, latest_checkpoint, new_run_dir, read_checkpoint, save_checkpoint,
                              write_json_atomic)
from fdfo.config import Config, Geometry, batch_geometry
from fdfo.phases import EpochSamples, build_training_set, sample_phase, train_phase
from fdfo.prompts import load_prompts, prompt_indices
from fdfo.rng import derive_seed
from fdfo.runlog import NullLogger, RunLogger
from fdfo.sd3 import SD3Policy

INIT_STREAM = 3
CHECKPOINT_FORMAT = 1


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


def train(cfg: Config) -> Path:
    """Run (or resume) training; returns the run folder."""
    device = dist.init(cfg.device)
    geom = batch_geometry(cfg, dist.get_world_size())  # user errors surface before any model loads
    all_prompts = load_prompts(cfg.prompt_file)
    dist.print0(geom.describe(cfg.total_pairs_per_epoch, cfg.sample.num_solver_steps))
    resume = find_resume_point(cfg)
    counters, state = read_checkpoint(resume) if resume is not None else ({"epoch": 0, "global_step": 0}, None)
    policy = build_policy(cfg, device)
    reward = build_reward_model(cfg, device)
    run_dir = prepare_run_dir(cfg)  # only now: a model that fails to load leaves no empty run folder behind
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

    logger = NullLogger()
    if dist.get_rank() == 0:
        config_dict = dataclasses.asdict(cfg) | {"geometry": dataclasses.asdict(geom), "run_dir": str(run_dir)}
        if not (run_dir / "config.json").exists():
            write_json_atomic(run_dir / "config.json", config_dict)
        logger = RunLogger(run_dir, config_dict, cfg.log_wandb)

    epoch, global_step = counters["epoch"], counters["global_step"]
    first_pair = dist.get_rank() * geom.pairs_per_gpu
    try:
        for epoch in range(epoch, cfg.num_epochs):
            t0 = time.perf_counter()
            policy.offload_text_encoders(False)
            idx = prompt_indices(len(all_prompts), cfg.seed, epoch * geom.total_pairs + first_pair,
                                 geom.pairs_per_gpu)
            policy.transformer.eval()
            samples = sample_phase(policy, reward, cfg, geom, epoch, [all_prompts[i] for i in idx], first_pair)
            t1 = time.perf_counter()
            data = build_training_set(samples, cfg, geom, epoch)
            if cfg.offload_text_encoders:
                policy.offload_text_encoders(True)
            policy.transformer.train()
            global_step, records = train_phase(policy, module, optimizer, scaler, data, cfg, geom, epoch, logger,
                                               global_step)
            t2 = time.perf_counter()
            record = log_epoch(logger, samples, data, epoch, dict(sample=t1 - t0, train=t2 - t1, total=t2 - t0),
                               records, cfg, geom)
            dist.print0(f"epoch {epoch}: reward {record['reward_mean']:.4f} +- {record['reward_std']:.4f}, "
                        f"loss {record['loss']:.4g}, clipfrac {record['clipfrac']:.3f}, {t2 - t0:.1f}s")
            if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.num_epochs:
                save(cfg, run_dir, policy, optimizer, scaler, epoch + 1, global_step, geom)
    finally:
        logger.close()
    return run_dir


def save(cfg: Config, run_dir: Path, policy: SD3Policy, optimizer, scaler, epochs_done: int, global_step: int,
         geom: Geometry) -> None:
    if dist.get_rank() == 0:
        counters = dict(format=CHECKPOINT_FORMAT, epoch=epochs_done, global_step=global_step, seed=cfg.seed,
                        prompt_position=epochs_done * geom.total_pairs, world_size=geom.world_size,
                        guidance_scale=cfg.sample.guidance_scale, pretrained_model=cfg.pretrained_model)
        save_checkpoint(checkpoint_dir(run_dir, epochs_done), policy.save_adapter,
                        {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, counters)
    dist.barrier()
