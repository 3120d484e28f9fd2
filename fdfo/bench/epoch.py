"""The measured epochs of `python -m fdfo.bench`: the real phases of train.py (sample_phase with its decode and reward,
build_training_set, train_phase) timed per phase, with peak device memory, FLOPs and MFU per pair."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import time
from pathlib import Path

import torch

from fdfo import compile as compile_cache
from fdfo import distributed as dist
from fdfo.bench.flops import PEAK_SOURCE, count_flops, flops_per_pair, peak_tflops, reward_flops, uses_cfg
from fdfo.bench.models import StubReward, build_models, fake_encoder, model_configs
from fdfo.bench.side import holding, side_model_bytes
from fdfo.config import Config, Geometry, batch_geometry
from fdfo.memory import training_activation_bytes
from fdfo.models.sd3_speed import SpeedLevers
from fdfo.phases import (
    build_training_set,
    rollout_dtypes,
    rollout_gb_per_rank,
    sample_phase,
    timesteps_per_sample,
    train_phase,
)

PAPER_PAIRS_PER_EPOCH = 432
PHASES = ("sample", "decode", "reward", "exchange", "train")


class PhaseMeter:
    """Wall time and peak device memory per named phase; phases may nest (the inner one is subtracted)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, inner seconds]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close_peak(self, name: str) -> None:
        if self.device.type == "cuda":
            self.peak[name] = max(self.peak.get(name, 0.0), torch.cuda.max_memory_allocated(self.device) / 1e9)
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        if self._stack:
            self._close_peak(self._stack[-1][0])
        elif self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self._sync()
            _, start, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._stack:
                self._stack[-1][2] += elapsed
            self._close_peak(name)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


class _Logger:
    def log(self, record: dict) -> None:
        pass


def env_info(device: torch.device) -> dict:
    import diffusers
    import peft

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(gpu=gpu, cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                diffusers=diffusers.__version__, peft=peft.__version__, world_size=dist.get_world_size(),
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def bench_config(args: argparse.Namespace) -> Config:
    cfg = Config(total_pairs_per_epoch=args.pairs * dist.get_world_size(), gradient_steps_per_epoch=args.gradient_steps,
                 image_log_pairs=0, lora_rank=8 if args.tiny else 32, lora_alpha=16.0 if args.tiny else 64.0)
    cfg.sample.num_solver_steps, cfg.sample.resolution = args.steps, args.resolution
    cfg.sample.batch_size, cfg.train.batch_size = args.sample_batch, args.train_batch
    cfg.sample.guidance_scale, cfg.sample.decode_batch_size = args.guidance_scale, args.decode_batch
    cfg.train.precision = args.precision
    cfg.train.compile, cfg.train.gradient_checkpointing = args.compile, args.grad_checkpoint
    cfg.train.compile_scope, cfg.train.cuda_graphs = args.compile_scope, args.cuda_graphs
    cfg.train.fused_rms_norm, cfg.train.compute_dtype_modulation = args.fused_rms_norm, args.compute_dtype_modulation
    cfg.train.timesteps_per_sample = args.timesteps_per_sample
    cfg.train.rollout_device = args.rollout_device
    cfg.reward.overlap_preprocessing = args.overlap_rewards
    timesteps_per_sample(cfg)  # ValueError for an impossible K
    return cfg


@dataclasses.dataclass
class Setup:
    """What the run measures: the device, train.py's config and geometry for the flags, the prompts, the FLOPs."""

    device: torch.device
    cfg: Config
    geom: Geometry
    prompts: list[str]
    flops: dict
    per_pair: dict


@dataclasses.dataclass
class Models:
    """The policy (built as train.py builds it), its optimizer, grad scaler, training module and the reward."""

    policy: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    module: torch.nn.Module
    reward: object


def prepare(args: argparse.Namespace) -> Setup:
    """The device (and process group), the config, geometry and FLOPs of the run; on a CPU fp32 is what train.py
    runs (CPU autocast in fp16 is not the reference path)."""
    from fdfo.bench.flops import bench_prompts

    if args.tiny and args.device is None:
        args.device = "cpu"
    device = dist.init(args.device)
    if args.memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    if device.type == "cpu" and args.precision != "fp32":
        args.precision = "fp32"
    cfg = bench_config(args)
    geom = batch_geometry(cfg, dist.get_world_size())
    prompts = bench_prompts(geom.pairs_per_gpu)
    flops = reward_flops(args, prompts) | count_flops(args.tiny, args.resolution, cfg.lora_rank)
    per_pair = flops_per_pair(flops, args.steps, uses_cfg(args), cfg.train.kl_weight, timesteps_per_sample(cfg))
    return Setup(device, cfg, geom, prompts, flops, per_pair)


def speed_options(policy, cfg: Config, compile_backend: str | None = None) -> None:
    """The run's speed options on the policy, exactly as train.py sets them (fdfo/train_loop.py setup); a compile
    backend other than train.py's only where the bench is asked for one (--compile-backend)."""
    t = cfg.train
    policy.speed_options(t.compile, t.gradient_checkpointing, t.compile_scope, t.fused_rms_norm,
                         t.compute_dtype_modulation, compile_backend)


def build(args: argparse.Namespace, setup: Setup) -> Models:
    """The models of the real shapes at random init, through SD3Policy.from_components and speed_options as train.py
    builds its policy; the optimizer, scaler and DDP wrapper as train.py makes them; the reward."""
    from fdfo.models.sd3 import SD3Policy
    from fdfo.train_loop import amp_dtype

    device, cfg = setup.device, setup.cfg
    torch.manual_seed(0)
    transformer, vae, scheduler = build_models(args.tiny, device)
    tcfg, _ = model_configs(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = SD3Policy.from_components(transformer, vae, scheduler, device, cfg.lora_rank, cfg.lora_alpha,
                                       cfg.sample.guidance_scale, amp_dtype(cfg.train.precision, device),
                                       fake_encoder(tcfg, device, dtype), levers=SpeedLevers.parse(args.levers))
    speed_options(policy, cfg, args.compile_backend)
    if cfg.train.compile and args.compile_cache_dir and compile_cache.load_cache(Path(args.compile_cache_dir)):
        print(f"--compile: warm start from {Path(args.compile_cache_dir) / compile_cache.CACHE_FILE}")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.train.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.amp_dtype == torch.float16)
    module = policy.transformer
    if dist.is_distributed():
        module = dist.wrap_ddp(policy.transformer, device)  # as train.py wraps it, so the bench times the same DDP
    if args.reward == "pickscore":
        from fdfo.bench.reward import pickscore_reward

        reward = pickscore_reward(args.tiny, device, cfg.reward.chunk_size)
    else:
        reward = StubReward()
    return Models(policy, optimizer, scaler, module, reward)


def measure_epochs(args: argparse.Namespace, setup: Setup, models: Models, side_bytes: int):
    """`args.repeats` epochs, each under a fresh PhaseMeter; returns (the last epoch's meter, its training set, the
    bytes per stored velocity element, read before the exchange frees the samples' copies). The reward is timed on
    the main thread: the whole scoring call, or with overlap its device-side parts (staging, the model forwards, and
    any wait for the worker's preparation); the worker's own time is hidden behind sampling."""
    from fdfo.models.sd3 import SD3Policy

    policy, reward, cfg, geom = models.policy, models.reward, setup.cfg, setup.geom
    timed = ("stage", "score_components") if args.overlap_rewards else ("components",)
    first_pair = dist.get_rank() * geom.pairs_per_gpu
    for epoch in range(args.repeats):
        meter = PhaseMeter(setup.device)
        policy.decode = meter.wrap("decode", SD3Policy.decode.__get__(policy))
        for method in timed:
            setattr(reward, method, meter.wrap("reward", getattr(type(reward), method).__get__(reward)))
        policy.transformer.eval()
        with meter.phase("sample"), holding(side_bytes, setup.device):  # released for training, as lowmem24 does
            samples = sample_phase(policy, reward, cfg, geom, epoch, setup.prompts, first_pair)
        velocity_bytes = samples.velocities.element_size()
        with meter.phase("exchange"):
            data = build_training_set(samples, cfg, geom, epoch)
        policy.transformer.train()
        with meter.phase("train"):
            train_phase(policy, models.module, models.optimizer, models.scaler, data, cfg, geom, epoch, _Logger(), 0)
        del samples
        if epoch < args.repeats - 1:
            del data
    return meter, data, velocity_bytes


def phase_table(meter: PhaseMeter, per_pair: dict, pairs: int, peak: float | None) -> dict:
    """Per phase: seconds per pair, peak memory, FLOPs, achieved TFLOP/s and MFU (the reward's CLIP runs in fp32: no
    MFU against the bf16/fp16 peak, only its achieved TFLOP/s)."""
    phases = {}
    for name in PHASES:
        s = meter.seconds.get(name, 0.0) / pairs
        achieved = per_pair[name] / s / 1e12 if per_pair[name] and s > 0 else None
        phases[name] = dict(s_per_pair=s, peak_mem_gb=meter.peak.get(name), flops_per_pair=per_pair[name],
                            achieved_tflops=achieved,
                            mfu=achieved / peak if achieved is not None and peak and name != "reward" else None)
    return phases


def totals(phases: dict, per_pair: dict, peak: float | None, world: int) -> dict:
    """The whole pair: seconds, GPU-seconds, achieved TFLOP/s, MFU, the largest phase peak and the projected epoch."""
    total_s = sum(p["s_per_pair"] for p in phases.values())
    total_flops = sum(v for v in per_pair.values() if v)
    peaks = [p["peak_mem_gb"] for p in phases.values() if p["peak_mem_gb"] is not None]
    return dict(s_per_pair=total_s, gpu_s_per_pair=total_s * world,
                achieved_tflops=total_flops / total_s / 1e12 if total_s > 0 else None,
                mfu=total_flops / total_s / 1e12 / peak if peak and total_s > 0 else None,
                peak_mem_gb=max(peaks) if peaks else None,
                epoch_s_projected=total_s * PAPER_PAIRS_PER_EPOCH / world,
                epoch_note=f"{PAPER_PAIRS_PER_EPOCH} pairs per epoch over {world} GPU(s) at the measured rate")


def run(args: argparse.Namespace) -> dict:
    """Measure one epoch (after `repeats - 1` warm-up epochs); returns the JSON record."""
    setup = prepare(args)
    models = build(args, setup)
    cfg, geom, policy = setup.cfg, setup.geom, models.policy
    activations = training_activation_bytes(policy, cfg, geom)
    side = side_model_bytes(args.tiny, with_pickscore=args.reward == "stub") if args.hold_side_models else {}
    meter, data, velocity_bytes = measure_epochs(args, setup, models, sum(side.values()))
    if args.compile and args.compile_cache_dir and dist.get_rank() == 0:
        Path(args.compile_cache_dir).mkdir(parents=True, exist_ok=True)
        compile_cache.save_cache(Path(args.compile_cache_dir))
    profile = None
    if args.profile:  # after the measured epoch, so the profiler's overhead never enters its times
        from fdfo.bench.profile import profile_calls

        profile = profile_calls(policy, models.module, models.scaler, models.optimizer, data, cfg, geom)
    del data
    env = env_info(setup.device)
    peak = peak_tflops(env["gpu"], args.precision)
    world = dist.get_world_size()
    phases = phase_table(meter, setup.per_pair, geom.pairs_per_gpu, peak)
    processor = (type(models.reward.terms[0].scorer.processor.image_processor).__name__
                 if args.reward == "pickscore" else None)
    state_bytes = torch.finfo(rollout_dtypes(policy)[0]).bits // 8
    return dict(
        env=env,
        config=dict(vars(args)) | dict(world_size=world, pairs_per_gpu=geom.pairs_per_gpu,
                                       sample_batch=geom.sample_batch, train_batch=geom.train_batch,
                                       lora_rank=cfg.lora_rank, reward_processor=processor),
        flops=dict(setup.flops, per_pair=setup.per_pair,
                   total_per_pair=sum(v for v in setup.per_pair.values() if v)),
        peak=dict(tflops=peak, source=PEAK_SOURCE, precision=args.precision),
        phases=phases,
        total=totals(phases, setup.per_pair, peak, world),
        rollout_gb_per_rank=rollout_gb_per_rank(geom, timesteps_per_sample(cfg),
                                                policy.latent_shape(args.resolution), state_bytes, velocity_bytes),
        activation_gb_estimate=activations / 1e9,
        side_models_gb={k: v / 1e9 for k, v in side.items()},
    ) | ({"profile": profile} if profile is not None else {})
