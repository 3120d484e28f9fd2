"""The FDFO training run: setup, then per epoch sample -> build items -> train -> log -> save (docs/algorithm.md §5)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo import compile as compile_cache
from fdfo import distributed as dist
from fdfo.algorithms.groups import (
    GroupSamples,
    algorithm_module,
    baseline_micro_batch,
    build_group_items,
    sample_groups,
)
from fdfo.checkpoints import checkpoint_dir, latest_checkpoint, read_checkpoint, save_checkpoint
from fdfo.cli import check_device
from fdfo.config import Config, Geometry, batch_geometry, check_config
from fdfo.errors import Interrupted
from fdfo.files import write_json_atomic
from fdfo.heldout import Heldout, heldout_due, heldout_plan
from fdfo.memory import activation_note, rollout_memory_note
from fdfo.models.base import PipelinePolicy
from fdfo.models.registry import check_family, default_guidance, family, load_policy, recorded_family
from fdfo.offline import ensure_hub_reachable, reward_sources
from fdfo.phases import (
    EpochSamples,
    build_training_set,
    check_rollout_memory,
    sample_phase,
    timesteps_per_sample,
    train_phase,
    training_diagnostics,
)
from fdfo.prompts import load_prompts, prompt_indices
from fdfo.resume import (
    apply_optimizer_settings,
    check_adapter_fits,
    check_resume_settings,
    find_resume_point,
    resolved_config,
)
from fdfo.rng import derive_seed
from fdfo.runlog import NullLogger, RunLogger, run_summary
from fdfo.safety import RunLock, SignalGuard, check_run_location, check_weights, prepare_run_dir, watch_parent
from rewards import build_metrics
from rewards.build import metric_specs
from rewards.remote import RewardServerDown

INIT_STREAM = 3
CHECKPOINT_FORMAT = 1


def amp_dtype(precision: str, device: torch.device, auto: str = "fp16") -> torch.dtype | None:
    """The autocast dtype of --train.precision; auto: the model's on CUDA (`auto`: its AUTO_PRECISION), fp32 else."""
    if precision == "auto":
        precision = auto if device.type == "cuda" else "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def build_policy(cfg: Config, device: torch.device) -> PipelinePolicy:
    """The run's policy (fdfo/models/: SD3 or FLUX, from --pretrained-model) with its LoRA."""
    # LoRA A matrices are drawn from the global RNG; seed it so every rank and every world size starts alike.
    torch.manual_seed(derive_seed(cfg.seed, INIT_STREAM))
    precision = amp_dtype(cfg.train.precision, device, family(cfg.pretrained_model).AUTO_PRECISION)
    with dist.rank0_first():  # rank 0 builds or downloads into the shared cache first
        return load_policy(cfg.pretrained_model, device, cfg.lora_rank, cfg.lora_alpha, cfg.sample.guidance_scale,
                           precision)


def build_reward_model(cfg: Config, device: torch.device):
    from rewards import build_reward

    with dist.rank0_first():
        return build_reward(cfg.reward_preset, cfg.reward, device)


def log_epoch(logger, samples: EpochSamples | GroupSamples, data, epoch: int, times: dict, records: list[dict],
              cfg: Config, geom: Geometry) -> dict:
    """Epoch statistics over all ranks' rewards (finite ones), plus phase times."""
    record = dict(epoch=epoch, prompt_position=(epoch + 1) * geom.total_pairs, invalid_pairs=data.invalid_pairs)
    if cfg.algorithm != "fdfo":  # samples left out of the loss mean (Flow-GRPO: advantage 0 at every step)
        record["dropped_samples"] = data.dropped
    for name, values in samples.rewards.items():
        values = dist.all_gather_cat(values)
        values = values[torch.isfinite(values)]
        record[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
        record[f"{name}_std"] = float(values.std()) if len(values) > 1 else 0.0
    record["loss"] = sum(r["loss"] for r in records) / len(records)
    record["clipfrac"] = sum(r["clipfrac"] for r in records) / len(records)
    if getattr(data, "ratio_dev", None) is not None:  # FDFO: branch separation and trust region (docs/toy.md)
        record |= training_diagnostics(data)
    record |= {f"time_{k}": round(v, 3) for k, v in times.items()}
    logger.log(record)
    if cfg.image_log_freq > 0 and epoch % cfg.image_log_freq == 0:
        n = len(samples.preview) // 2
        shown = samples.rewards["reward"].reshape(-1, cfg.samples_per_prompt)[:n, :2].flatten()  # samples 0, 1
        logger.log_pairs(epoch, samples.preview, samples.prompts[:n], shown)
    return record


@dataclass
class Run:
    """Everything an epoch needs, built once by `setup`."""

    cfg: Config
    geom: Geometry
    prompts: list[str]
    policy: PipelinePolicy
    reward: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    module: torch.nn.Module  # the network trained: the LoRA transformer, wrapped in DDP under torchrun
    run_dir: Path
    logger: NullLogger
    epoch: int  # epochs done
    global_step: int
    guard: SignalGuard | None = None
    copies: object = None  # a baseline's EMA (and DiffusionNFT's old) adapter, fdfo.algorithms.ema.Copies
    heldout: Heldout | None = None  # the held-out evaluation (--eval.every > 0)


def setup(cfg: Config, locks: list) -> Run:
    """Check the user's input, load the models, restore a checkpoint if there is one, open the run folder and log.

    Every check that can fail on user input (flags, device, run folder, lock, prompts, resume settings, checkpoint)
    runs before a model loads and before anything is written; `locks` receives the run-folder lock held by rank 0."""
    device, geom, prompts, plan = check_inputs(cfg, locks)
    resume, counters, state, applied = resume_point(cfg, geom)
    # without a network: one line now instead of minutes of download retries
    heldout_metrics = metric_specs(cfg.eval.metrics) if plan is not None and cfg.eval.metrics else []
    ensure_hub_reachable([cfg.pretrained_model, *reward_sources(cfg.reward.specs, cfg.reward, cfg.reward_preset),
                          *reward_sources(heldout_metrics, cfg.reward)])
    reward = build_reward_model(cfg, device)  # first: a plug-in that answers wrongly fails before the model loads
    metrics = None
    if heldout_metrics:
        with dist.rank0_first():
            metrics = build_metrics(cfg.eval.metrics, cfg.reward, device)
    policy = build_policy(cfg, device)
    policy.speed_options(cfg.train.compile, cfg.train.gradient_checkpointing, cfg.train.compile_scope,
                         cfg.train.fused_rms_norm, cfg.train.compute_dtype_modulation)
    dist.print0(rollout_memory_note(policy, cfg, geom))
    if dist.get_rank() == 0:  # a meta-device forward (about a second at full size): once is enough
        dist.print0(activation_note(policy, cfg, geom))
    optimizer, scaler, copies = training_state(cfg, policy, device, counters["global_step"])
    if state is not None:
        policy.load_adapter(resume)
        if copies is not None:  # the saved adapter is the EMA; theta (and old) come from training_state.pt
            copies.restore(state)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        apply_optimizer_settings(optimizer, cfg)
        dist.print0(f"resumed from {resume} (epoch {counters['epoch']}, step {counters['global_step']})")
        for line in applied:
            dist.print0(f"resume: {line} (applied from the next step)")
    module = policy.transformer
    if dist.is_distributed():
        module = dist.wrap_ddp(policy.transformer, device)  # gradients only: buffers are not broadcast
    run_dir = prepare_run_dir(cfg, locks)  # only now: a model that fails to load leaves no empty run folder behind
    dist.print0(f"run folder: {run_dir}")
    if cfg.train.compile and compile_cache.load_cache(run_dir):  # the kernels an earlier start compiled
        dist.print0(f"--train.compile: warm start from {run_dir / compile_cache.CACHE_FILE}")
    logger = open_logger(cfg, geom, run_dir, counters["epoch"])
    heldout = Heldout(cfg, geom, plan, policy, reward, metrics, run_dir, logger) if plan is not None else None
    return Run(cfg, geom, prompts, policy, reward, optimizer, scaler, module, run_dir, logger, counters["epoch"],
               counters["global_step"], copies=copies, heldout=heldout)


def check_inputs(cfg: Config, locks: list) -> tuple[torch.device, Geometry, list[str], object]:
    """The checks of the flags, device, run folder, geometry, prompts and held-out prompts (before any model loads);
    returns the device, the geometry, the training prompts and the held-out plan (None with --eval.every 0)."""
    check_config(cfg)
    if cfg.sample.guidance_scale is None:  # the model's own: SD3 1 (no CFG), FLUX.1-dev its distilled 3.5
        cfg.sample.guidance_scale = default_guidance(cfg.pretrained_model)
    check_device("--device", cfg.device)
    check_run_location(cfg)
    device = dist.init(cfg.device)
    geom = batch_geometry(cfg, dist.get_world_size())  # user errors surface before any model loads
    timesteps_per_sample(cfg)
    check_rollout_memory(cfg, geom, device)
    prompts = load_prompts(cfg.prompt_file)
    plan = heldout_plan(cfg, prompts) if cfg.eval.every else None
    trained = (cfg.sample.num_solver_steps if cfg.algorithm == "fdfo"
               else algorithm_module(cfg.algorithm).trained_steps(cfg.sample.num_solver_steps))
    dist.print0(geom.describe(cfg.total_pairs_per_epoch, trained,
                              None if cfg.algorithm == "fdfo" else cfg.baseline.group_size))
    if dist.get_rank() == 0 and cfg.run_dir is not None and Path(cfg.run_dir).is_dir():
        locks.append(RunLock(Path(cfg.run_dir)))  # a double start is refused before minutes of model loading
    return device, geom, prompts, plan


def resume_point(cfg: Config, geom: Geometry) -> tuple[Path | None, dict, dict | None, list[str]]:
    """The checkpoint to resume from (None: a fresh run), its counters and training state, checked against this run's
    settings; and the lines describing the settings applied from the next step."""
    resume = find_resume_point(cfg)
    if resume is None:
        return None, {"epoch": 0, "global_step": 0}, None, []
    counters, state = read_checkpoint(resume)
    trained_on = counters.get("pretrained_model")
    check_family(str(resume), recorded_family(counters.get("model_family"), trained_on), trained_on,
                 cfg.pretrained_model)
    recorded = counters.get("algorithm", "fdfo")
    if recorded != cfg.algorithm:
        raise ValueError(f"cannot resume {resume}: it was trained with --algorithm {recorded}, not "
                         f"{cfg.algorithm}; pass --algorithm {recorded}, or a new --run-dir to start a new run")
    needed = {"flow_grpo": ("grpo_theta",), "diffusion_nft": ("nft_theta", "nft_old")}.get(cfg.algorithm, ())
    if not set(needed) <= set(state):
        raise ValueError(f"checkpoint {resume} is damaged: its training_state.pt lacks {cfg.algorithm}'s trained "
                         f"adapter{'s' if len(needed) > 1 else ''} ({', '.join(needed)}; the saved adapter is the "
                         f"EMA). Delete it to resume from the previous checkpoint, or pass --resume-from another "
                         f"one.")
    check_adapter_fits(cfg, resume)
    return resume, counters, state, check_resume_settings(cfg, geom, resume)


def training_state(cfg: Config, policy, device: torch.device, global_step: int):
    """The optimizer, the grad scaler and a baseline's adapter copies (EMA, old), as they start (a resumed run then
    loads its saved state into them)."""
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.train.learning_rate, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.amp_dtype == torch.float16)
    copies = None
    if cfg.algorithm != "fdfo":
        from fdfo.algorithms.ema import baseline_copies

        copies = baseline_copies(cfg, policy.trainable_parameters(), global_step)
    return optimizer, scaler, copies


def open_logger(cfg: Config, geom: Geometry, run_dir: Path, first_epoch: int):
    """Rank 0 writes config.json (what this run uses: all checks have passed) and opens the log, dropping records of
    epochs it will redo; the other ranks get a null logger."""
    if dist.get_rank() != 0:
        return NullLogger()
    config = resolved_config(cfg, geom, run_dir)
    write_json_atomic(run_dir / "config.json", config)
    return RunLogger(run_dir, config, cfg.log_wandb, first_redone_epoch=first_epoch)


def run_epoch(run: Run) -> None:
    """sample -> build the shuffled items -> train -> log -> save; advances run.epoch. (The held-out evaluation of
    the epochs done runs between epochs: `train`.)"""
    cfg, geom, policy, epoch = run.cfg, run.geom, run.policy, run.epoch
    t0 = time.perf_counter()
    policy.offload_text_encoders(False)
    first_pair = dist.get_rank() * geom.pairs_per_gpu
    idx = prompt_indices(len(run.prompts), cfg.seed, epoch * geom.total_pairs + first_pair, geom.pairs_per_gpu)
    policy.transformer.eval()
    prompts = [run.prompts[i] for i in idx]
    micro_batch = after_step = None
    if cfg.algorithm == "fdfo":
        samples = sample_phase(policy, run.reward, cfg, geom, epoch, prompts, first_pair)
    else:  # DiffusionNFT samples (and computes v_old) with the old adapter, Flow-GRPO with theta
        old = run.copies.old
        with run.copies.swapped(old) if old is not None else contextlib.nullcontext():
            samples = sample_groups(policy, run.reward, cfg, geom, epoch, prompts, first_pair)
        micro_batch, after_step = baseline_micro_batch, run.copies.after_step
    t1 = time.perf_counter()
    data = (build_training_set if cfg.algorithm == "fdfo" else build_group_items)(samples, cfg, geom, epoch)
    run.reward.offload()  # to CPU until the next sampling phase, with --reward.offload
    if cfg.offload_text_encoders:
        policy.offload_text_encoders(True)
    policy.transformer.train()
    run.global_step, records = train_phase(policy, run.module, run.optimizer, run.scaler, data, cfg, geom, epoch,
                                           run.logger, run.global_step, micro_batch, after_step)
    if cfg.algorithm == "diffusion_nft":
        from fdfo.algorithms.diffusion_nft import old_policy_decay
        from fdfo.algorithms.ema import blend_

        blend_(run.copies.old, run.copies.params, keep=old_policy_decay(run.global_step))
    t2 = time.perf_counter()
    record = log_epoch(run.logger, samples, data, epoch, dict(sample=t1 - t0, train=t2 - t1, total=t2 - t0), records,
                       cfg, geom)
    run.logger.draw_curve()
    dist.print0(f"epoch {epoch}: reward {record['reward_mean']:.4f} +- {record['reward_std']:.4f}, "
                f"loss {record['loss']:.4g}, clipfrac {record['clipfrac']:.3f}, {t2 - t0:.1f}s")
    run.epoch += 1
    if run.epoch % cfg.save_freq == 0 or run.epoch == cfg.num_epochs or heldout_due(cfg, run.epoch):
        save(run)  # an evaluated epoch is a checkpoint, so that best.json can name it


def train(cfg: Config) -> Path:
    """Run (or resume) training; returns the run folder.

    SIGINT / SIGTERM end the run with `Interrupted` (a checkpoint being written is finished first), whose hint says how
    to resume; the run-folder lock is released on every way out (and by the kernel if the process dies)."""
    guard = SignalGuard().install()
    watch_parent()
    locks: list[RunLock] = []
    run = None
    try:
        run = setup(cfg, locks)
        run.guard = guard
        while not (run.heldout is not None and run.heldout.step(run.epoch, run.policy, run.copies)):
            if run.epoch >= cfg.num_epochs:
                break
            guard.check()
            run_epoch(run)
        if dist.get_rank() == 0:
            print(run_summary(run.run_dir, latest_checkpoint(run.run_dir)), flush=True)
        return run.run_dir
    except Interrupted as e:
        e.hint = resume_hint(cfg, run.run_dir if run is not None else None)
        raise
    except RewardServerDown as e:  # like a pre-emption: the last checkpoint is intact
        raise RewardServerDown(f"{e}; start the server again and "
                               f"{resume_hint(cfg, run.run_dir if run is not None else None)}") from None
    finally:
        try:
            if run is not None:
                run.logger.close()
        finally:
            for lock in locks:
                lock.release()
            guard.uninstall()


def resume_hint(cfg: Config, run_dir: Path | None) -> str:
    if run_dir is None:
        return "nothing was written; rerun the same command to start"
    newest = latest_checkpoint(run_dir)
    start = "epoch 0 (no checkpoint yet)"
    if newest is not None:
        start = f"epoch {int(newest.name.split('-')[1])} ({newest})"
    command = "the same command" if cfg.run_dir is not None else f"the same command with --run-dir {run_dir}"
    return f"rerun {command} to resume from {start}"


def save(run: Run) -> None:
    """Rank 0 writes the checkpoint of the epochs done so far (never a non-finite adapter); the other ranks wait."""
    check_weights(run.policy.adapter_state(), run.epoch - 1, run.global_step)  # every rank: all raise together
    if dist.get_rank() == 0:
        cfg, epochs_done = run.cfg, run.epoch
        counters = dict(format=CHECKPOINT_FORMAT, epoch=epochs_done, global_step=run.global_step, seed=cfg.seed,
                        prompt_position=epochs_done * run.geom.total_pairs, world_size=run.geom.world_size,
                        guidance_scale=cfg.sample.guidance_scale, pretrained_model=cfg.pretrained_model,
                        model_family=run.policy.FAMILY,
                        algorithm=cfg.algorithm, resolution=cfg.sample.resolution,
                        num_solver_steps=cfg.sample.num_solver_steps)
        state = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict()}
        save_adapter = run.policy.save_adapter
        if run.copies is not None:  # the baselines: the EMA is the adapter saved (and evaluated); theta (old) resume
            state |= run.copies.state()

            def save_adapter(folder, copies=run.copies):
                with copies.swapped(copies.ema):
                    run.policy.save_adapter(folder)
        with run.guard.critical():  # a signal now waits until the checkpoint is complete
            save_checkpoint(checkpoint_dir(run.run_dir, epochs_done), save_adapter, state, counters)
        if cfg.train.compile:  # what a resumed run would otherwise compile again
            compile_cache.save_cache(run.run_dir)
    dist.barrier()
