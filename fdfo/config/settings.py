"""The training settings: nested dataclasses whose attribute docstrings tyro turns into `python train.py --help`.
Defaults are the published runs of docs/algorithm.md §6."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fdfo.heldout_config import HeldoutConfig
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
    preset: Literal["paper", "smoke", "smoke_flux", "lowmem24", "sd35l", "flow_grpo", "diffusion_nft",
                    "smoke_flow_grpo", "smoke_diffusion_nft"] = "paper"
    """Named starting point that the other flags override: 'paper' (docs/algorithm.md §6), 'smoke' (tiny CPU run),
    'smoke_flux' (the same on the tiny FLUX),
    'lowmem24' (the paper's run on one 24 GB GPU, with the PickScore reward), 'sd35l' (the paper's run on SD3.5-Large,
    fitted to one 80 GB GPU), 'flow_grpo' / 'diffusion_nft' (the published baselines, docs/algorithm.md §11) and their
    tiny CPU runs 'smoke_flow_grpo' / 'smoke_diffusion_nft'."""
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
