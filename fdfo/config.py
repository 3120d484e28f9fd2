"""Training configuration: nested dataclasses (tyro turns the attribute docstrings into --help), the named
presets, and the batch geometry of docs/algorithm.md §5. Defaults are the published runs of docs/algorithm.md §6."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fdfo.heldout_config import HeldoutConfig, check_heldout_metrics, heldout_problems, smoke_heldout
from fdfo.models.sd3 import SD35_MEDIUM
from rewards.config import RewardConfig


@dataclass
class SampleConfig:
    num_solver_steps: int = 40
    """Euler steps per trajectory (T)."""
    guidance_scale: float | None = None
    """Guidance, used while sampling and while training; default: the model's. SD3 / SD3.5: the classifier-free
    guidance scale g (default 1: no CFG; any other value costs two forward passes per velocity). FLUX.1-dev: the
    distilled guidance embedding fed to the network (default 3.5; one forward pass, never CFG)."""
    resolution: int = 512
    """Image height and width in pixels (a multiple of 16)."""
    batch_size: int | None = None
    """Pairs per sampling batch; default: the largest divisor of pairs-per-GPU <= max batch size."""
    decode_batch_size: int | None = 1
    """Images per VAE decode call; default 1, as the authors' training (their VAE's slicing). N > 1 decodes N at once
    (None: the whole sampling batch): fewer, larger kernels, about 0.95 GB more peak memory per extra 512 px image
    (fp16), and the kernels' rounding for that batch size (docs/performance.md)."""
    churn_schedule: Literal["raw", "interval", "prior"] = "raw"
    """Where fresh noise separates the two branches of a pair (docs/algorithm.md §2): raw (every step but the last),
    interval (around a random noise level per pair, experimental), prior (only before the first step, experimental)."""
    churn_weight: float | None = None
    """Churn strength; default: the schedule's own. raw: gamma = w exactly (default 0.0025); interval: w0, the median
    of the per-pair weight w in c_j = exp(w p_j) - 1 (default 1.0); prior: the median of the per-pair w in
    gamma = exp(w) - 1 (default 0.1)."""


@dataclass
class TrainConfig:
    learning_rate: float = 3e-5
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_range: float = 0.03
    """SPO trust region epsilon of the ratio."""
    trust_region: Literal["separation", "velocity"] = "separation"
    """FDFO's SPO ratio: "separation" (the published one; its trust region shrinks with the branch separation) or
    "velocity" (opt-in: the log-ratio scaled by 1 / (2 rms(dx)), so epsilon bounds the velocity change along the
    finite-difference direction; docs/toy.md, "The trust-region scale")."""
    kl_weight: float = 0.0
    """Weight of mean((v - v_base)^2) with the adapter disabled for v_base; 0 skips the extra forward."""
    batch_size: int | None = None
    """Training items per micro-batch; default: the largest divisor of items-per-step <= max batch size."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Autocast precision. auto: fp16 with a grad scaler on CUDA (the reference), fp32 on CPU."""
    compile: bool = False
    """Speed option: torch.compile the transformer (--train.compile-scope), batch size dynamic, caches kept in the
    run folder for a warm resume; same math up to the compiled kernels' rounding, off by default."""
    compile_scope: Literal["blocks", "transformer"] = "blocks"
    """With --train.compile: each transformer block (regional: one graph per block kind and grad mode, 6 for
    SD3.5-M) or the whole transformer forward (one graph per grad mode; longer to compile, fuses across blocks)."""
    gradient_checkpointing: bool = False
    """Memory option: recompute each transformer block's activations in the backward pass; same math."""
    cuda_graphs: bool = False
    """Speed option (CUDA only): capture the training micro-batch in a CUDA graph and replay it; same numbers as
    eager by design, but NOT YET VERIFIED ON A GPU (tests/test_cuda_graphs.py, marked gpu, has not run)."""
    fused_rms_norm: bool = False
    """Numerics option, moves rounding: the attention's RMS norms as one kernel each way (Triton on CUDA), the
    variance summed in another order, the backward rounded once (docs/algorithm.md, Differences). Sampling and
    training alike."""
    compute_dtype_modulation: bool = False
    """Numerics option, moves rounding: round each LayerNorm's fp32 output to the autocast dtype, so the modulation
    after it runs in fp16 / bf16 instead of fp32 (docs/algorithm.md, Differences). Sampling and training alike."""
    rollout_device: Literal["auto", "cpu"] = "auto"
    """Where the epoch's rollouts are kept: auto = the training device; cpu = host memory (each micro-batch is copied
    to the GPU; for small GPUs, see --preset lowmem24)."""
    timesteps_per_sample: int | None = None
    """Train K of the T timesteps of each trajectory (drawn per pair before sampling; only those are stored).
    Default: all T, as in the paper. K < T changes the estimator: each pair's gradient sums K instead of T terms."""


@dataclass
class BaselineConfig:
    """Settings of the baselines (--algorithm flow_grpo / diffusion_nft, docs/algorithm.md §11); FDFO ignores them."""

    group_size: int = 24
    """Samples per prompt (G); each of --total-pairs-per-epoch prompts gets G samples (FDFO: always a pair)."""
    noise_level: float = 0.7
    """Flow-GRPO's SDE noise level a: std = a sqrt(sigma / (1 - sigma))."""
    nft_beta: float = 1.0
    """DiffusionNFT's beta of the implicit policies (0.1 for multi-reward in the paper)."""
    ema_decay: float = 0.9
    """Cap of the EMA decay min((1 + s) / (10 + s), cap): the saved and evaluated adapter is this EMA of the trained
    one (theta itself resumes from training_state.pt)."""
    ema_interval: int | None = None
    """Optimizer steps between EMA updates; default the authors': 8 for flow_grpo, 1 for diffusion_nft."""
    ema_blends: int = 1
    """Blends of the EMA at each update point: it keeps d^n of its old value (n = this). The authors' Flow-GRPO blends
    once per training batch of the step: 2 in their 32-GPU run, which the flow_grpo preset sets (docs/algorithm.md
    §11)."""


@dataclass
class Config:
    preset: Literal["paper", "smoke", "lowmem24", "flow_grpo", "diffusion_nft", "smoke_flow_grpo",
                    "smoke_diffusion_nft"] = "paper"
    """Named starting point that the other flags override: 'paper' (docs/algorithm.md §6), 'smoke' (tiny CPU run),
    'lowmem24' (the paper's run on one 24 GB GPU, with the PickScore reward), 'flow_grpo' / 'diffusion_nft' (the
    published baselines, docs/algorithm.md §11) and their tiny CPU runs 'smoke_flow_grpo' / 'smoke_diffusion_nft'."""
    algorithm: Literal["fdfo", "flow_grpo", "diffusion_nft"] = "fdfo"
    """Training method: fdfo (this repository's), or a baseline run in the same loop (docs/algorithm.md §11)."""
    seed: int = 6
    """Base seed; the noise of pair i in epoch e is seeded from (seed, e, i), independent of rank and world size."""
    num_epochs: int = 1000
    """Epoch to stop after (counting epochs already done when resuming)."""
    save_freq: int = 5
    """Save a checkpoint every this many epochs (and after the last one, and at every held-out evaluation)."""
    resume_from: str | None = None
    """Checkpoint folder (runs/.../checkpoints/epoch-XXXXXXX) to continue from; default: the newest in --run-dir."""
    run_dir: str | None = None
    """Exact output folder; rerunning with the same folder resumes. Default: a new runs/<5-digit id>-<run-name>/."""
    run_name: str = "fdfo"
    """Name part of the default run folder."""
    pretrained_model: str = SD35_MEDIUM
    """Hugging Face id or local folder of the base model: an SD3 / SD3.5 pipeline (default SD3.5-Medium), or FLUX.1-dev
    (black-forest-labs/FLUX.1-dev); builtin:tiny-sd3 and builtin:tiny-flux are the offline test models
    (docs/models.md)."""
    prompt_file: str = "prompt_sets/pickscore_train.txt"
    """Training prompts, one per line."""
    lora_rank: int = 32
    """LoRA rank r."""
    lora_alpha: float = 64.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    total_pairs_per_epoch: int = 432
    """Prompt pairs sampled per epoch over all GPUs (two reward evaluations each)."""
    gradient_steps_per_epoch: int = 4
    """Optimizer steps per epoch."""
    max_batch_size: int | None = None
    """Upper bound for sampling and training batches; default 6, or 13 from 8 GPUs up."""
    reward_preset: str = "combined"
    """Reward: pickscore, vlm_alignment, combined (1.0 PickScore + 0.1 VLM); redness, brightness (analytic, for
    tests)."""
    offload_text_encoders: bool = True
    """Move the text encoders to CPU during the training phase."""
    image_log_freq: int = 10
    """Save a few rollout pairs as PNG every this many epochs (0 disables)."""
    image_log_pairs: int = 4
    """How many rollout pairs to save each time."""
    log_wandb: bool = False
    """Also send records and image pairs to Weights & Biases."""
    device: str | None = None
    """Torch device; default cuda:<local rank> when CUDA is available, else cpu."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)  # held-out evaluation (fdfo/heldout.py)

    @property
    def samples_per_prompt(self) -> int:
        """2 for FDFO (a pair), G for the baselines."""
        return 2 if self.algorithm == "fdfo" else self.baseline.group_size


# The smoke presets' prompts ship with the repository; found from any working directory.
SMOKE_PROMPTS = str(Path(__file__).resolve().parents[1] / "prompt_sets" / "smoke.txt")


def smoke_config() -> Config:
    """A short CPU run: the tiny offline pipeline, 64 px, 6 steps, an analytic colour reward.

    Larger churn and learning rate than the paper because the tiny model takes few, coarse steps and the run is short;
    the reward still rises by many standard errors (tests/test_cli.py checks it).
    """
    return Config(
        preset="smoke",
        seed=1,
        num_epochs=16,
        save_freq=4,
        run_name="smoke",
        pretrained_model="builtin:tiny-sd3",
        prompt_file=SMOKE_PROMPTS,
        lora_rank=8,
        lora_alpha=16.0,
        total_pairs_per_epoch=16,
        gradient_steps_per_epoch=2,
        max_batch_size=16,
        reward_preset="redness",
        image_log_freq=5,
        image_log_pairs=2,
        sample=SampleConfig(num_solver_steps=6, resolution=64, churn_weight=0.2),
        train=TrainConfig(learning_rate=1e-2),
        eval=smoke_heldout(),
    )


def lowmem24_config() -> Config:
    """The paper's settings fitted to ONE 24 GB GPU (designed from the memory model in README "Performance", not
    measured on such a card): gradient checkpointing, micro-batches of at most 2, one image per VAE decode (kept
    whatever the default), rollouts in host memory, text encoders (default) and the reward model parked on CPU while
    training. The reward is PickScore alone: the combined preset's VLM does not fit next to SD3.5-M on 24 GB. Same
    math as 'paper' otherwise (batching only)."""
    cfg = Config(preset="lowmem24", max_batch_size=2, reward_preset="pickscore")
    cfg.sample.decode_batch_size = 1
    cfg.train.gradient_checkpointing = True
    cfg.train.rollout_device = "cpu"
    cfg.reward.offload = True
    return cfg


def flow_grpo_config() -> Config:
    """Flow-GRPO as its authors ran it (docs/algorithm.md §11, the SD3.5-M PickScore configuration) on FDFO's prompts
    and reward: 48 prompts x G = 24 images (1,152 reward evaluations) and 2 optimizer steps per epoch, SDE sampling
    with a = 0.7 and T = 10, CFG 4.5 in sampling and loss, lr 3e-4, clip 1e-4, KL beta 0.01 (0.04 for GenEval / OCR),
    the EMA (every 8 steps, blended twice there as in their 32-GPU run) saved."""
    cfg = Config(preset="flow_grpo", algorithm="flow_grpo", run_name="flow_grpo", total_pairs_per_epoch=48,
                 gradient_steps_per_epoch=2)
    cfg.baseline.ema_blends = 2
    cfg.sample.num_solver_steps = 10
    cfg.sample.guidance_scale = 4.5
    cfg.train.learning_rate = 3e-4
    cfg.train.clip_range = 1e-4
    cfg.train.kl_weight = 0.01
    return cfg


def diffusion_nft_config() -> Config:
    """DiffusionNFT as its authors ran it (docs/algorithm.md §11) on FDFO's prompts and reward: 48 prompts x G = 24
    images (1,152 reward evaluations) and 1 optimizer step per epoch, deterministic 10-step DPM-Solver++(2M) rollouts
    at CFG 1, beta 1, the EMA (cap 0.9, every step) saved; lr 3e-4 as Flow-GRPO."""
    cfg = Config(preset="diffusion_nft", algorithm="diffusion_nft", run_name="diffusion_nft",
                 total_pairs_per_epoch=48, gradient_steps_per_epoch=1)
    cfg.sample.num_solver_steps = 10
    cfg.sample.guidance_scale = 1.0
    cfg.train.learning_rate = 3e-4
    return cfg


def _smoke_baseline(algorithm: str, learning_rate: float) -> Config:
    """The smoke run's model, prompts, reward and epochs, with groups of 4 (8 prompts: 32 samples, as smoke's 16
    pairs) and no CFG."""
    cfg = smoke_config()
    cfg.preset, cfg.algorithm, cfg.run_name = f"smoke_{algorithm}", algorithm, f"smoke_{algorithm}"
    cfg.total_pairs_per_epoch = 8
    cfg.baseline.group_size = 4
    cfg.sample.churn_weight = None
    cfg.train.learning_rate = learning_rate
    return cfg


# Measured (tests/test_algorithms_sd3.py, paired: the saved adapter, the EMA, vs the initial one on epoch 0's prompts
# and noise, seeds 1, 2, 3): Flow-GRPO +0.0119 / +0.0162 / +0.0129 redness (7.9 to 29 standard errors), DiffusionNFT
# (DPM-Solver++(2M) rollouts) +0.0038 / +0.0021 / +0.0011 (6.0 to 20 standard errors).
def smoke_flow_grpo_config() -> Config:
    cfg = _smoke_baseline("flow_grpo", 1e-2)
    cfg.train.clip_range = 1e-4
    cfg.train.kl_weight = 0.01
    return cfg


def smoke_diffusion_nft_config() -> Config:
    return _smoke_baseline("diffusion_nft", 3e-3)


PRESETS = {"paper": Config, "smoke": smoke_config, "lowmem24": lowmem24_config, "flow_grpo": flow_grpo_config,
           "diffusion_nft": diffusion_nft_config, "smoke_flow_grpo": smoke_flow_grpo_config,
           "smoke_diffusion_nft": smoke_diffusion_nft_config}


# ----------------------------------------------------------------------------------------------------------------------
# Batch geometry (docs/algorithm.md §5).


@dataclass(frozen=True)
class Geometry:
    world_size: int
    pairs_per_gpu: int
    sample_batch: int
    train_batch: int
    grad_accum: int
    items_per_step: int
    """Training items per optimizer step per rank and per timestep: 2 * pairs_per_gpu / gradient_steps."""
    gradient_steps: int
    pair_multiple: int = 1
    """Pairs (prompts) per GPU must be a multiple of this for the items to split into the optimizer steps."""

    @property
    def total_pairs(self) -> int:
        return self.pairs_per_gpu * self.world_size

    def describe(self, requested_pairs: int, num_steps: int, group: int | None = None) -> str:
        """The arithmetic, printed at start; group: G of a group method (--algorithm flow_grpo / diffusion_nft),
        None for FDFO's pairs. A request that does not split over the GPUs gets a second line saying what is
        trained instead."""
        unit = "pairs" if group is None else f"prompts x {group}"
        per_epoch = f"{self.total_pairs} {unit} per epoch"
        if group is not None:
            per_epoch += f" = {self.total_pairs * group} samples"
        line = (
            f"batch geometry: {requested_pairs} {unit} requested / {self.world_size} GPU(s) -> "
            f"{self.pairs_per_gpu} {unit} per GPU ({per_epoch}); sample batch {self.sample_batch} {unit}; "
            f"{self.gradient_steps} optimizer steps per epoch, each over {self.items_per_step} "
            f"{'items' if group is None else 'samples'} x {num_steps} timesteps per GPU = "
            f"{num_steps * self.grad_accum} micro-batches of {self.train_batch}"
        )
        if self.total_pairs != requested_pairs:
            step = self.world_size * self.pair_multiple
            lower, upper = requested_pairs // step * step, (requested_pairs // step + 1) * step
            line += (f"\nbatch geometry: ROUNDED: --total-pairs-per-epoch {requested_pairs} does not split over "
                     f"{self.world_size} GPU(s) in multiples of {self.pair_multiple}; training {self.total_pairs} "
                     f"({requested_pairs - self.total_pairs} fewer). Pass {lower if lower else upper} or {upper} to "
                     f"choose.")
        return line


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def batch_geometry(cfg: Config, world_size: int) -> Geometry:
    """Resolve pairs per GPU and the sampling / training batch sizes; raise ValueError for impossible requests."""
    total, steps, group = cfg.total_pairs_per_epoch, cfg.gradient_steps_per_epoch, cfg.samples_per_prompt
    if steps < 1:
        raise ValueError(f"--gradient-steps-per-epoch must be >= 1, got {steps}")
    # G * pairs_per_gpu items (G = 2: a pair) must split evenly into `steps` optimizer steps.
    multiple = steps // math.gcd(group, steps)
    pairs_per_gpu = total // world_size // multiple * multiple
    if pairs_per_gpu < 1:
        need = world_size * multiple
        raise ValueError(
            f"--total-pairs-per-epoch {total} is too small for {world_size} GPU(s) and {steps} gradient steps: each "
            f"GPU needs a multiple of {multiple} pairs. Use --total-pairs-per-epoch >= {need} or fewer "
            f"--gradient-steps-per-epoch."
        )
    max_batch = cfg.max_batch_size if cfg.max_batch_size is not None else (13 if world_size >= 8 else 6)
    if max_batch < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch}")
    items_per_step = group * pairs_per_gpu // steps
    # a sampling batch of b prompts holds b * G images: at most about as many as max_batch pairs (FDFO: unchanged)
    sample_batch = _checked_batch(cfg.sample.batch_size, pairs_per_gpu, max(1, 2 * max_batch // group),
                                  "--sample.batch-size", "pairs per GPU")
    train_batch = _checked_batch(cfg.train.batch_size, items_per_step, max_batch, "--train.batch-size",
                                 f"items per step ({group} * pairs per GPU / gradient steps)")
    return Geometry(world_size, pairs_per_gpu, sample_batch, train_batch, items_per_step // train_batch,
                    items_per_step, steps, multiple)


def _checked_batch(requested: int | None, n: int, max_batch: int, flag: str, what: str) -> int:
    if requested is None:
        return _largest_divisor(n, max_batch)
    if requested < 1 or n % requested:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"{flag} {requested} must divide the {n} {what}; valid values: {divisors}")
    return requested


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: called before the run folder is created or a model is loaded.


def check_config(cfg: Config) -> None:
    """Raise one ValueError listing every flag outside its valid range (one clause per problem)."""
    problems = []

    def need(ok: bool, flag: str, value, allowed: str) -> None:
        if not ok:
            problems.append(f"{flag} {value} is invalid: it must be {allowed}")

    s, t = cfg.sample, cfg.train
    need(cfg.seed >= 0, "--seed", cfg.seed, ">= 0")
    need(cfg.num_epochs >= 1, "--num-epochs", cfg.num_epochs, ">= 1")
    need(cfg.save_freq >= 1, "--save-freq", cfg.save_freq, ">= 1")
    need(cfg.total_pairs_per_epoch >= 1, "--total-pairs-per-epoch", cfg.total_pairs_per_epoch, ">= 1")
    need(cfg.gradient_steps_per_epoch >= 1, "--gradient-steps-per-epoch", cfg.gradient_steps_per_epoch, ">= 1")
    need(cfg.max_batch_size is None or cfg.max_batch_size >= 1, "--max-batch-size", cfg.max_batch_size, ">= 1")
    need(s.batch_size is None or s.batch_size >= 1, "--sample.batch-size", s.batch_size, ">= 1")
    need(s.decode_batch_size is None or 1 <= s.decode_batch_size <= 2**16, "--sample.decode-batch-size",
         s.decode_batch_size, "in 1..65536 (images per VAE call; None decodes a whole sampling batch at once)")
    need(t.batch_size is None or t.batch_size >= 1, "--train.batch-size", t.batch_size, ">= 1")
    need(cfg.image_log_freq >= 0, "--image-log-freq", cfg.image_log_freq, ">= 0 (0 disables)")
    need(cfg.image_log_pairs >= 0, "--image-log-pairs", cfg.image_log_pairs, ">= 0")
    need(cfg.lora_rank >= 1, "--lora-rank", cfg.lora_rank, ">= 1")
    need(_finite(cfg.lora_alpha) and cfg.lora_alpha > 0, "--lora-alpha", cfg.lora_alpha, "> 0")
    need(s.num_solver_steps >= 1, "--sample.num-solver-steps", s.num_solver_steps, ">= 1")
    need(s.resolution >= 1, "--sample.resolution", s.resolution, ">= 1 (a multiple of the model's patch size)")
    need(s.guidance_scale is None or _finite(s.guidance_scale), "--sample.guidance-scale", s.guidance_scale,
         "a finite number (SD3: 1 disables CFG), or left out for the model's own")
    need(s.churn_weight is None or (_finite(s.churn_weight) and s.churn_weight >= 0), "--sample.churn-weight",
         s.churn_weight, ">= 0 (or left out for the schedule's default)")
    need(_finite(t.learning_rate) and t.learning_rate > 0, "--train.learning-rate", t.learning_rate, "> 0")
    need(len(t.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in t.betas), "--train.betas",
         " ".join(map(str, t.betas)), "two numbers in [0, 1)")
    need(_finite(t.eps) and t.eps > 0, "--train.eps", t.eps, "> 0")
    need(_finite(t.weight_decay) and t.weight_decay >= 0, "--train.weight-decay", t.weight_decay, ">= 0")
    need(_finite(t.clip_range) and t.clip_range > 0, "--train.clip-range", t.clip_range, "> 0")
    need(_finite(t.kl_weight) and t.kl_weight >= 0, "--train.kl-weight", t.kl_weight, ">= 0")
    need(_finite(t.max_grad_norm) and t.max_grad_norm >= 0, "--train.max-grad-norm", t.max_grad_norm,
         ">= 0")
    _check_speed_options(cfg, need)
    b = cfg.baseline
    if cfg.algorithm != "fdfo":
        need(b.group_size >= 2, "--baseline.group-size", b.group_size, ">= 2 (group-relative advantages)")
        need(t.timesteps_per_sample is None, "--train.timesteps-per-sample", t.timesteps_per_sample,
             f"left out with --algorithm {cfg.algorithm} (the method fixes its trained steps)")
        need(_finite(b.noise_level) and b.noise_level > 0, "--baseline.noise-level", b.noise_level, "> 0")
        need(_finite(b.nft_beta) and b.nft_beta > 0, "--baseline.nft-beta", b.nft_beta, "> 0")
        need(_finite(b.ema_decay) and 0 <= b.ema_decay < 1, "--baseline.ema-decay", b.ema_decay, "in [0, 1)")
        need(b.ema_interval is None or b.ema_interval >= 1, "--baseline.ema-interval", b.ema_interval, ">= 1")
        need(b.ema_blends >= 1, "--baseline.ema-blends", b.ema_blends, ">= 1")
        need(t.trust_region == "separation", "--train.trust-region", t.trust_region,
             f"left out with --algorithm {cfg.algorithm} (it sets FDFO's SPO ratio)")
    r = cfg.reward
    need(_finite(r.remote_timeout) and r.remote_timeout > 0, "--reward.remote-timeout", r.remote_timeout, "> 0")
    need(r.remote_retries >= 0, "--reward.remote-retries", r.remote_retries, ">= 0")
    problems += heldout_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    from rewards.build import check_specs, training_specs

    # every spec parses, plug-ins import, reward servers answer: before any model loads or the run folder exists
    check_specs(training_specs(cfg.reward_preset, cfg.reward), cfg.reward, cfg.sample.resolution)
    check_heldout_metrics(cfg)


def _check_speed_options(cfg: Config, need) -> None:
    t = cfg.train
    need(t.compile or t.compile_scope == "blocks", "--train.compile-scope", t.compile_scope,
         "left out without --train.compile (it says what --train.compile compiles)")
    if t.cuda_graphs:
        import torch

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        need(device.startswith("cuda"), "--train.cuda-graphs", "on", f"left out on {device} (CUDA graphs need a GPU)")
        for on, flag in ((t.rollout_device == "cpu", "--train.rollout-device cpu"), (t.compile, "--train.compile"),
                         (t.gradient_checkpointing, "--train.gradient-checkpointing")):
            need(not on, "--train.cuda-graphs", "on", f"left out with {flag} (not supported together)")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
