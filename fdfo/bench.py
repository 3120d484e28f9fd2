"""Throughput benchmark of one FDFO epoch: `python -m fdfo.bench` (docs/benchmarks.md, README "Performance").

Runs the real phases that train.py runs (sample_phase with its decode and reward, build_training_set, train_phase)
on random-init models of the real SD3.5-Medium shapes, so nothing is downloaded: the MMDiT-X transformer and the
16-channel VAE at their published configs (fdfo/tiny.py SD35M_*_CONFIG), fake text embeddings of the real shapes
(77 CLIP + 128 T5 tokens x 4096, pooled 2048) and a stub reward, or with --reward pickscore a random-init CLIP of
PickScore's ViT-H/14 shape scored by the repository's own CLIPScorer (fdfo/bench_reward.py; --overlap-rewards turns
on --reward.overlap-preprocessing). Timing is the same work as a real epoch except the text encoders (and the reward
model with the stub). --flops-only counts the FLOPs on the meta device (no weights, no GPU) with FlopCounterMode.

    python -m fdfo.bench --tiny                     # CPU, tiny shapes, a few seconds
    python -m fdfo.bench --pairs 4 --out b.json     # on a GPU, full shape, 512 px, 40 steps
    python -m fdfo.bench --pairs 6 --sample-batch 3 --reward pickscore --overlap-rewards
    python -m fdfo.bench --flops-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from pathlib import Path

import torch

from fdfo import distributed as dist
from fdfo.bench_report import report_markdown  # noqa: F401  (python -m fdfo.bench --report; tests use it here)
from fdfo.bench_side import holding, side_model_bytes
from fdfo.config import Config, batch_geometry
from fdfo.memory import TEXT_TOKENS, training_activation_bytes
from fdfo.outputs import check_output_path, write_text
from fdfo.phases import (
    build_training_set,
    rollout_dtypes,
    rollout_gb_per_rank,
    sample_phase,
    timesteps_per_sample,
    train_phase,
)

# Dense bf16 / fp16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's spec sheets (SXM parts, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
PEAK_SOURCE = "NVIDIA spec sheet, dense bf16/fp16 tensor-core peak (no sparsity); MFU = achieved / peak"
PAPER_PAIRS_PER_EPOCH = 432
REPORT_OUT = "docs/benchmarks.md"  # --report's default --out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fdfo.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model shapes on CPU (a few seconds; for tests)")
    p.add_argument("--device", default=None, help="torch device; default cuda:<local rank> if available, else cpu")
    p.add_argument("--pairs", type=int, default=None, help="pairs per GPU sampled and trained (default 4; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps T (default 40; tiny 4)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; tiny 64)")
    p.add_argument("--sample-batch", type=int, default=None, help="pairs per sampling batch (default: as train.py)")
    p.add_argument("--train-batch", type=int, default=None, help="items per micro-batch (default: as train.py)")
    p.add_argument("--decode-batch", type=int, default=1,
                   help="images per VAE decode call (default 1, as training; --sample.decode-batch-size)")
    p.add_argument("--gradient-steps", type=int, default=4, help="optimizer steps per epoch (default 4)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="training autocast precision (default fp16, the reference; fp32 on CPU)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (default 1: no CFG)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (--train.compile)")
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing per transformer block")
    p.add_argument("--timesteps-per-sample", type=int, default=None,
                   help="train K of the T timesteps per trajectory (default all T; --train.timesteps-per-sample)")
    p.add_argument("--repeats", type=int, default=None, help="epochs run; the last one is measured (default 2; tiny 1)")
    p.add_argument("--rollout-device", choices=["auto", "cpu"], default="auto",
                   help="keep the rollouts on the training device (auto) or in host memory (--train.rollout-device)")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process's CUDA memory to this fraction of the GPU (e.g. 24/141: a 24 GB card)")
    p.add_argument("--reward", choices=["stub", "pickscore"], default="stub",
                   help="stub: a brightness mean (default); pickscore: a random-init CLIP ViT-H/14 (tiny: a 2-layer "
                        "CLIP) through rewards.clip.CLIPScorer, fp32, the real preprocessing")
    p.add_argument("--overlap-rewards", action="store_true",
                   help="--reward.overlap-preprocessing: prepare a batch's reward inputs while the next one is sampled "
                        "(needs --reward pickscore and 2 or more sampling batches to overlap anything)")
    p.add_argument("--hold-side-models", action="store_true",
                   help="hold a device buffer the size of SD3.5-M's text encoders (bf16) and, with the stub reward, "
                        "PickScore (fp32) through each sampling phase, freed for training as lowmem24 offloads them "
                        "(fdfo/bench_side.py); for memory-cap checks")
    p.add_argument("--profile", action="store_true",
                   help="after the measured epochs, torch.profiler tables (top 15 kernels) of one sampling forward and "
                        "one training micro-batch, into the JSON (fdfo/bench_profile.py)")
    p.add_argument("--flops-only", action="store_true", help="only count FLOPs on the meta device at the full shape")
    p.add_argument("--out", default=None, help="write the results as JSON to this file (with --report: the markdown)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="no run: summarise the bench JSON files in DIR (and DIR/status.txt) as markdown into --out")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked, and the output path, before anything is built or measured; ValueError naming the bench's
    own flag (not train.py's) and what it allows. Fills in the defaults that depend on --tiny."""
    from fdfo.cli import check_device

    if args.report is not None:
        if not Path(args.report).is_dir():
            raise FileNotFoundError(f"--report {args.report!r}: no such folder of bench JSON files")
        args.out = str(check_output_path("--out", args.out if args.out is not None else REPORT_OUT, folder=False))
        return
    if args.out is not None:
        check_output_path("--out", args.out, folder=False)
    check_device("--device", args.device)
    defaults = dict(pairs=2, steps=4, resolution=64, repeats=1) if args.tiny else dict(pairs=4, steps=40,
                                                                                       resolution=512, repeats=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.decode_batch is not None and args.decode_batch < 1:
        raise ValueError(f"--decode-batch must be >= 1, got {args.decode_batch}")
    for flag in ("pairs", "steps", "repeats", "gradient_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.resolution < 16 or args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 16, at least 16 (e.g. 64 or 512)")
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale {args.guidance_scale} must be a finite number (1 disables CFG)")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    on_cpu = args.device is None and (args.tiny or not torch.cuda.is_available()) or \
        args.device is not None and torch.device(args.device).type == "cpu"
    if args.memory_fraction is not None and on_cpu:
        raise ValueError("--memory-fraction caps CUDA memory and does nothing on a CPU; leave it out, or run on a GPU "
                         "(--device cuda)")
    if args.overlap_rewards and args.reward == "stub":
        raise ValueError("--overlap-rewards needs --reward pickscore: --reward stub has no preprocessing to overlap")
    if args.timesteps_per_sample is not None and not 1 <= args.timesteps_per_sample <= args.steps:
        raise ValueError(f"--timesteps-per-sample {args.timesteps_per_sample} must be between 1 and --steps "
                         f"{args.steps}")
    # the geometry train.py would derive, checked here with the bench's flag names: 2 x pairs samples split into
    # --gradient-steps equal optimizer steps (train.py would round --pairs down; the bench measures what is asked)
    multiple = args.gradient_steps // math.gcd(2, args.gradient_steps)
    if args.pairs % multiple:
        raise ValueError(f"--pairs {args.pairs} must be a multiple of {multiple} for --gradient-steps "
                         f"{args.gradient_steps} (the 2 x {args.pairs} samples split into equal optimizer steps)")
    per_step = 2 * args.pairs // args.gradient_steps
    for flag, value, n, what in (("--sample-batch", args.sample_batch, args.pairs, f"--pairs {args.pairs}"),
                                 ("--train-batch", args.train_batch, per_step, f"the {per_step} samples per optimizer "
                                  "step (2 x --pairs / --gradient-steps)")):
        if value is not None and (value < 1 or n % value):
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(f"{flag} {value} must divide {what}; valid values: {divisors}")


# ----------------------------------------------------------------------------------------------------------------------
# Models of the real shapes.


def model_configs(tiny: bool) -> tuple[dict, dict]:
    """(transformer kwargs, VAE kwargs): SD3.5-Medium, or the tiny offline pipeline's (fdfo/tiny.py)."""
    from fdfo import tiny as t

    if not tiny:
        return t.SD35M_TRANSFORMER_CONFIG, t.SD35M_VAE_CONFIG
    return t.TRANSFORMER_CONFIG, t.VAE_CONFIG


def build_models(tiny: bool, device: torch.device):
    """Random-init transformer and VAE, created directly on `device` (no CPU copy of the full model)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-init models: no warnings about casting pretrained weights
    tcfg, vcfg = model_configs(tiny)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**tcfg)
        vae = AutoencoderKL(**vcfg)
    return transformer, vae, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def fake_encoder(tcfg: dict, device: torch.device, dtype: torch.dtype):
    """Prompt -> fixed random embeddings of the real shapes (the text encoders are not part of the benchmark)."""
    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        g = torch.Generator(device).manual_seed(len(prompts))
        n = len(prompts)
        return {"embeds": torch.randn(n, TEXT_TOKENS, tcfg["joint_attention_dim"], generator=g, device=device,
                                      dtype=dtype),
                "pooled": torch.randn(n, tcfg["pooled_projection_dim"], generator=g, device=device, dtype=dtype)}
    return encode


class StubReward:
    """Mean image brightness plus a small per-sample offset: finite, cheap, distinct within each pair."""

    def components(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        score = torch.nan_to_num(images.float().mean(dim=(1, 2, 3)), nan=0.0)
        return {"reward": score + 1e-3 * torch.arange(len(images), device=images.device)}

    def offload(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs on the meta device.


def count_flops(tiny: bool, resolution: int, lora_rank: int = 32) -> dict[str, float]:
    """FLOPs of one transformer forward per image, of one training item (forward + backward with the frozen base and
    the LoRA), and of one VAE decode per image, at the given resolution; counted without weights (meta device)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    tcfg, vcfg = model_configs(tiny)
    side = resolution // 8
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**tcfg).requires_grad_(False)
        vae = AutoencoderKL(**vcfg).requires_grad_(False)
        model = with_lora(transformer, lora_rank)
        x = torch.randn(1, tcfg["in_channels"], side, side)
        inputs = dict(hidden_states=x, timestep=torch.ones(1),
                      encoder_hidden_states=torch.randn(1, TEXT_TOKENS, tcfg["joint_attention_dim"]),
                      pooled_projections=torch.randn(1, tcfg["pooled_projection_dim"]))
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                model(**inputs, return_dict=False)
        with FlopCounterMode(display=False) as train:
            model(**inputs, return_dict=False)[0].float().square().mean().backward()
        with FlopCounterMode(display=False) as decode:
            with torch.no_grad():
                vae.decode(x, return_dict=False)
    return {"fwd_per_image": float(forward.get_total_flops()), "train_item": float(train.get_total_flops()),
            "decode_per_image": float(decode.get_total_flops())}


def bench_prompts(count: int) -> list[str]:
    """The bench's prompts (what they say does not matter; their token count enters the reward's text FLOPs)."""
    return [f"prompt {i}" for i in range(count)]


def reward_flops(args: argparse.Namespace, prompts: list[str]) -> dict[str, float]:
    """--reward pickscore: the CLIP's FLOPs per image and per prompt (fdfo/bench_reward.py); the stub: none."""
    from fdfo import bench_reward

    return bench_reward.count_flops(args.tiny, prompts) if args.reward == "pickscore" else {}


def with_lora(transformer: torch.nn.Module, lora_rank: int) -> torch.nn.Module:
    """The LoRA exactly as count_flops adds it (alpha = 2 r, the paper's ratio; alpha does not change FLOPs)."""
    from fdfo.sd3 import add_lora

    return add_lora(transformer, lora_rank, 2.0 * lora_rank)


def flops_per_pair(flops: dict[str, float], steps: int, guidance_scale: float, kl_weight: float = 0.0,
                   trained_steps: int | None = None) -> dict:
    """Per pair: sampling 2 T forwards (x2 with CFG), decode 2 images, training 2 K items (K = T unless
    --timesteps-per-sample; + a forward with KL), scoring 2 (image, prompt) with --reward pickscore (else None)."""
    trained_steps = steps if trained_steps is None else trained_steps
    cfg_factor = 2 if guidance_scale != 1.0 else 1
    train_item = flops["train_item"] * cfg_factor + (flops["fwd_per_image"] * cfg_factor if kl_weight > 0 else 0.0)
    reward = 2 * (flops["reward_image"] + flops["reward_text_per_prompt"]) if "reward_image" in flops else None
    return {"sample": 2 * steps * cfg_factor * flops["fwd_per_image"], "decode": 2 * flops["decode_per_image"],
            "reward": reward, "exchange": 0.0, "train": 2 * trained_steps * train_item}


# ----------------------------------------------------------------------------------------------------------------------
# Measuring the phases.


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


def peak_tflops(gpu: str | None, precision: str) -> float | None:
    if gpu is None or precision == "fp32":
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def bench_config(args: argparse.Namespace) -> Config:
    cfg = Config(total_pairs_per_epoch=args.pairs * dist.get_world_size(), gradient_steps_per_epoch=args.gradient_steps,
                 image_log_pairs=0, lora_rank=8 if args.tiny else 32, lora_alpha=16.0 if args.tiny else 64.0)
    cfg.sample.num_solver_steps, cfg.sample.resolution = args.steps, args.resolution
    cfg.sample.batch_size, cfg.train.batch_size = args.sample_batch, args.train_batch
    cfg.sample.guidance_scale, cfg.sample.decode_batch_size = args.guidance_scale, args.decode_batch
    cfg.train.precision = args.precision
    cfg.train.compile, cfg.train.gradient_checkpointing = args.compile, args.grad_checkpoint
    cfg.train.timesteps_per_sample = args.timesteps_per_sample
    cfg.train.rollout_device = args.rollout_device
    cfg.reward.overlap_preprocessing = args.overlap_rewards
    timesteps_per_sample(cfg)  # ValueError for an impossible K
    return cfg


def run(args: argparse.Namespace) -> dict:
    """Measure one epoch (after `repeats - 1` warm-up epochs); returns the JSON record."""
    from fdfo.sd3 import SD3Policy
    from fdfo.train_loop import amp_dtype

    if args.tiny and args.device is None:
        args.device = "cpu"
    device = dist.init(args.device)
    if args.memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    if device.type == "cpu" and args.precision != "fp32":
        args.precision = "fp32"  # CPU autocast in fp16 is not the reference path; fp32 is what train.py runs
    cfg = bench_config(args)
    geom = batch_geometry(cfg, dist.get_world_size())
    prompts = bench_prompts(geom.pairs_per_gpu)
    flops = reward_flops(args, prompts) | count_flops(args.tiny, args.resolution, cfg.lora_rank)
    per_pair = flops_per_pair(flops, args.steps, args.guidance_scale, cfg.train.kl_weight,
                              timesteps_per_sample(cfg))

    torch.manual_seed(0)
    transformer, vae, scheduler = build_models(args.tiny, device)
    tcfg, _ = model_configs(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = SD3Policy.from_components(transformer, vae, scheduler, device, cfg.lora_rank, cfg.lora_alpha,
                                       cfg.sample.guidance_scale, amp_dtype(cfg.train.precision, device),
                                       fake_encoder(tcfg, device, dtype))
    policy.speed_options(cfg.train.compile, cfg.train.gradient_checkpointing)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.train.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.amp_dtype == torch.float16)
    module = policy.transformer
    if dist.is_distributed():
        module = dist.wrap_ddp(policy.transformer, device)  # as train.py wraps it, so the bench times the same DDP
    if args.reward == "pickscore":
        from fdfo.bench_reward import pickscore_reward

        reward = pickscore_reward(args.tiny, device, cfg.reward.chunk_size)
    else:
        reward = StubReward()
    # timed on the main thread: the whole scoring call, or with overlap its device-side parts (staging, the model
    # forwards, and any wait for the worker's preparation); the worker's own time is hidden behind sampling
    timed = ("stage", "score_components") if args.overlap_rewards else ("components",)
    processor = type(reward.terms[0].scorer.processor.image_processor).__name__ if args.reward == "pickscore" else None
    first_pair = dist.get_rank() * geom.pairs_per_gpu
    state_dtype = rollout_dtypes(policy)[0]
    activations = training_activation_bytes(policy, cfg, geom)
    side = side_model_bytes(args.tiny, with_pickscore=args.reward == "stub") if args.hold_side_models else {}
    velocity_bytes = None
    for epoch in range(args.repeats):
        meter = PhaseMeter(device)
        policy.decode = meter.wrap("decode", SD3Policy.decode.__get__(policy))
        for method in timed:
            setattr(reward, method, meter.wrap("reward", getattr(type(reward), method).__get__(reward)))
        policy.transformer.eval()
        with meter.phase("sample"), holding(sum(side.values()), device):  # released for training, as lowmem24 does
            samples = sample_phase(policy, reward, cfg, geom, epoch, prompts, first_pair)
        velocity_bytes = samples.velocities.element_size()
        with meter.phase("exchange"):
            data = build_training_set(samples, cfg, geom, epoch)
        policy.transformer.train()
        with meter.phase("train"):
            train_phase(policy, module, optimizer, scaler, data, cfg, geom, epoch, _Logger(), 0)
        if epoch < args.repeats - 1:
            del samples, data
    profile = None
    if args.profile:  # after the measured epoch, so the profiler's overhead never enters its times
        from fdfo.bench_profile import profile_calls

        profile = profile_calls(policy, module, scaler, optimizer, data, cfg, geom)
    del samples, data

    env = env_info(device)
    peak = peak_tflops(env["gpu"], args.precision)
    pairs = geom.pairs_per_gpu
    phases = {}  # the reward's CLIP runs in fp32: no MFU against the bf16/fp16 peak, only its achieved TFLOP/s
    for name in ("sample", "decode", "reward", "exchange", "train"):
        s = meter.seconds.get(name, 0.0) / pairs
        achieved = per_pair[name] / s / 1e12 if per_pair[name] and s > 0 else None
        phases[name] = dict(s_per_pair=s, peak_mem_gb=meter.peak.get(name), flops_per_pair=per_pair[name],
                            achieved_tflops=achieved,
                            mfu=achieved / peak if achieved is not None and peak and name != "reward" else None)
    total_s = sum(p["s_per_pair"] for p in phases.values())
    total_flops = sum(v for v in per_pair.values() if v)
    peaks = [p["peak_mem_gb"] for p in phases.values() if p["peak_mem_gb"] is not None]
    latent = policy.latent_shape(args.resolution)
    world = dist.get_world_size()
    return dict(
        env=env,
        config=dict(vars(args)) | dict(world_size=world, pairs_per_gpu=pairs, sample_batch=geom.sample_batch,
                                       train_batch=geom.train_batch, lora_rank=cfg.lora_rank,
                                       reward_processor=processor),
        flops=dict(flops, per_pair=per_pair, total_per_pair=total_flops),
        peak=dict(tflops=peak, source=PEAK_SOURCE, precision=args.precision),
        phases=phases,
        total=dict(s_per_pair=total_s, gpu_s_per_pair=total_s * world,
                   achieved_tflops=total_flops / total_s / 1e12 if total_s > 0 else None,
                   mfu=total_flops / total_s / 1e12 / peak if peak and total_s > 0 else None,
                   peak_mem_gb=max(peaks) if peaks else None,
                   epoch_s_projected=total_s * PAPER_PAIRS_PER_EPOCH / world,
                   epoch_note=f"{PAPER_PAIRS_PER_EPOCH} pairs per epoch over {world} GPU(s) at the measured rate"),
        rollout_gb_per_rank=rollout_gb_per_rank(geom, timesteps_per_sample(cfg), latent,
                                                torch.finfo(state_dtype).bits // 8,
                                                velocity_bytes),
        activation_gb_estimate=activations / 1e9,
        side_models_gb={k: v / 1e9 for k, v in side.items()},
    ) | ({"profile": profile} if profile is not None else {})


def flops_record(args: argparse.Namespace) -> dict:
    flops = reward_flops(args, bench_prompts(args.pairs)) | count_flops(args.tiny, args.resolution)
    per_pair = flops_per_pair(flops, args.steps, args.guidance_scale)
    return dict(config=dict(vars(args)), flops=dict(flops, per_pair=per_pair,
                                                    total_per_pair=sum(v for v in per_pair.values() if v)))


def flop_text(flops: float) -> str:
    """FLOPs in the unit that shows them (TFLOP for the full shapes, GFLOP or MFLOP for --tiny's)."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.4g} {unit}"
    return f"{flops:.4g} FLOP"


def print_summary(record: dict) -> None:
    """The run's numbers in a few lines; on a CPU without the GPU-only ones (GPU-seconds, MFU, peak memory)."""
    f = record["flops"]
    print(f"FLOPs: forward {flop_text(f['fwd_per_image'])} per image, training item {flop_text(f['train_item'])}, "
          f"decode {flop_text(f['decode_per_image'])} per image; "
          + (f"reward {flop_text(f['per_pair']['reward'])} per pair; " if f["per_pair"]["reward"] else "")
          + f"{flop_text(f['total_per_pair'])} per pair")
    if "total" not in record:
        return
    for name, p in record["phases"].items():
        mem = f", peak {p['peak_mem_gb']:.1f} GB" if p["peak_mem_gb"] is not None else ""
        mfu = f", MFU {p['mfu']:.1%}" if p["mfu"] is not None else ""
        print(f"{name:>8}: {p['s_per_pair']:.3f} s/pair{mfu}{mem}")
    t, world = record["total"], record["env"]["world_size"]
    if record["env"]["gpu"] is not None:
        spent = f" ({t['gpu_s_per_pair']:.3f} GPU-s/pair)"
    else:  # CPU: process-seconds, and only when several processes share the work
        spent = f" ({t['gpu_s_per_pair']:.3f} CPU-process-s/pair over {world} processes)" if world > 1 else ""
    mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
    print(f"   total: {t['s_per_pair']:.3f} s/pair{spent}{mfu}; rollouts {record['rollout_gb_per_rank']:.3g} GB per "
          f"rank; training activations {record['activation_gb_estimate']:.3g} GB per micro-batch (estimate, "
          f"fdfo/memory.py)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # every flag and the output path checked before any work
    if args.report is not None:
        skipped: list[tuple[str, str]] = []
        text = report_markdown(Path(args.report), skipped)
        for name, why in skipped:
            print(f"skipped {Path(args.report) / name}: {why}")
        write_text(args.out, text)
        print(f"wrote {args.out}")
        return {"report": text, "skipped": skipped}
    record = flops_record(args) if args.flops_only else run(args)
    if dist.get_rank() == 0:
        print_summary(record)
        if args.out:
            replaced = write_text(args.out, json.dumps(record, indent=1, default=str) + "\n")
            print(f"{'replaced' if replaced else 'wrote'} {args.out}")
    return record


if __name__ == "__main__":
    from fdfo.cli import run_main

    run_main(main, None)
