"""The named presets (`--preset`): starting points that the other flags override."""

from __future__ import annotations

from pathlib import Path

from fdfo.config.settings import Config, SampleConfig, TrainConfig
from fdfo.heldout_config import smoke_heldout
from fdfo.models.sd3 import SD35_LARGE

# The smoke presets' prompts ship with the repository; found from any working directory.
SMOKE_PROMPTS = str(Path(__file__).resolve().parents[2] / "prompt_sets" / "smoke.txt")


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


def smoke_flux_config() -> Config:
    """The smoke run on the tiny FLUX (builtin:tiny-flux, fdfo/models/tiny_flux.py): the same prompts, reward, steps,
    size, churn and LoRA; guidance is FLUX's distilled 3.5 (one forward per velocity, no CFG). Its images differ less
    in redness than the tiny SD3's (a reward std about 4x smaller) and its LoRA adapts every block projection: at the
    smoke run's learning rate 84 % of the ratios are clipped after one step, and 16 pairs per epoch leave the reward
    flat. Hence a third of the learning rate (3e-3) on 3x the pairs (48); docs/models.md gives the runs."""
    cfg = smoke_config()
    cfg.preset, cfg.run_name, cfg.pretrained_model = "smoke_flux", "smoke_flux", "builtin:tiny-flux"
    cfg.train.learning_rate, cfg.total_pairs_per_epoch = 3e-3, 48
    return cfg


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


def sd35l_config() -> Config:
    """The paper's settings on SD3.5-Large for ONE 80 GB GPU (or several), counted from the memory model, not
    measured (docs/performance.md "SD3.5-Large on one 80 GB GPU"): micro-batches of at most 6 (the paper's; from 8 GPUs
    up the default would be 13, 59.6 GB of activations), no gradient checkpointing (27.5 GB of activations per
    micro-batch of 6, counted; checkpointing would cut them to 2.1 GB at about a third more training compute), and the
    reward models parked on CPU outside the scoring phase. Counted on one GPU: 53.6 GB while training, 57.2 GB of
    weights and rollouts while sampling (tests/test_models.py recounts it)."""
    cfg = Config(preset="sd35l", pretrained_model=SD35_LARGE, run_name="sd35l", max_batch_size=6)
    cfg.train.gradient_checkpointing = False
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


PRESETS = {"paper": Config, "smoke": smoke_config, "smoke_flux": smoke_flux_config, "lowmem24": lowmem24_config,
           "sd35l": sd35l_config,
           "flow_grpo": flow_grpo_config,
           "diffusion_nft": diffusion_nft_config, "smoke_flow_grpo": smoke_flow_grpo_config,
           "smoke_diffusion_nft": smoke_diffusion_nft_config}
