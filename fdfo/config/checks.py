"""The checks of the training flags, called before the run folder is created or a model is loaded: one ValueError
naming every flag outside its valid range."""

from __future__ import annotations

import math

from fdfo.config.settings import Config
from fdfo.heldout_config import check_heldout_metrics, heldout_problems


def check_config(cfg: Config) -> None:
    """Raise one ValueError listing every flag outside its valid range (one clause per problem)."""
    problems = []

    def need(ok: bool, flag: str, value, allowed: str) -> None:
        if not ok:
            problems.append(f"{flag} {value} is invalid: it must be {allowed}")

    _check_run(cfg, need)
    _check_sampling(cfg, need)
    _check_training(cfg, need)
    _check_speed_options(cfg, need)
    if cfg.algorithm != "fdfo":
        _check_baseline(cfg, need)
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


def _check_run(cfg: Config, need) -> None:
    need(cfg.seed >= 0, "--seed", cfg.seed, ">= 0")
    need(cfg.num_epochs >= 1, "--num-epochs", cfg.num_epochs, ">= 1")
    need(cfg.save_freq >= 1, "--save-freq", cfg.save_freq, ">= 1")
    need(cfg.total_pairs_per_epoch >= 1, "--total-pairs-per-epoch", cfg.total_pairs_per_epoch, ">= 1")
    need(cfg.gradient_steps_per_epoch >= 1, "--gradient-steps-per-epoch", cfg.gradient_steps_per_epoch, ">= 1")
    need(cfg.max_batch_size is None or cfg.max_batch_size >= 1, "--max-batch-size", cfg.max_batch_size, ">= 1")
    need(cfg.image_log_freq >= 0, "--image-log-freq", cfg.image_log_freq, ">= 0 (0 disables)")
    need(cfg.image_log_pairs >= 0, "--image-log-pairs", cfg.image_log_pairs, ">= 0")
    need(cfg.lora_rank >= 1, "--lora-rank", cfg.lora_rank, ">= 1")
    need(_finite(cfg.lora_alpha) and cfg.lora_alpha > 0, "--lora-alpha", cfg.lora_alpha, "> 0")


def _check_sampling(cfg: Config, need) -> None:
    s = cfg.sample
    need(s.batch_size is None or s.batch_size >= 1, "--sample.batch-size", s.batch_size, ">= 1")
    need(s.decode_batch_size is None or 1 <= s.decode_batch_size <= 2**16, "--sample.decode-batch-size",
         s.decode_batch_size, "in 1..65536 (images per VAE call; None decodes a whole sampling batch at once)")
    need(s.num_solver_steps >= 1, "--sample.num-solver-steps", s.num_solver_steps, ">= 1")
    need(s.resolution >= 1, "--sample.resolution", s.resolution, ">= 1 (a multiple of the model's patch size)")
    need(s.guidance_scale is None or _finite(s.guidance_scale), "--sample.guidance-scale", s.guidance_scale,
         "a finite number (SD3: 1 disables CFG), or left out for the model's own")
    need(s.churn_weight is None or (_finite(s.churn_weight) and s.churn_weight >= 0), "--sample.churn-weight",
         s.churn_weight, ">= 0 (or left out for the schedule's default)")


def _check_training(cfg: Config, need) -> None:
    t = cfg.train
    need(t.batch_size is None or t.batch_size >= 1, "--train.batch-size", t.batch_size, ">= 1")
    need(_finite(t.learning_rate) and t.learning_rate > 0, "--train.learning-rate", t.learning_rate, "> 0")
    need(len(t.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in t.betas), "--train.betas",
         " ".join(map(str, t.betas)), "two numbers in [0, 1)")
    need(_finite(t.eps) and t.eps > 0, "--train.eps", t.eps, "> 0")
    need(_finite(t.weight_decay) and t.weight_decay >= 0, "--train.weight-decay", t.weight_decay, ">= 0")
    need(_finite(t.clip_range) and t.clip_range > 0, "--train.clip-range", t.clip_range, "> 0")
    need(_finite(t.kl_weight) and t.kl_weight >= 0, "--train.kl-weight", t.kl_weight, ">= 0")
    need(_finite(t.max_grad_norm) and t.max_grad_norm >= 0, "--train.max-grad-norm", t.max_grad_norm,
         ">= 0")


def _check_baseline(cfg: Config, need) -> None:
    b, t = cfg.baseline, cfg.train
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
