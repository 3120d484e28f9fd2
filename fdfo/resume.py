"""Resuming a run: where from, and what a resumed run does with settings that differ from its config.json.

Checked before any model loads (train_loop.setup), so a refused resume changes nothing on disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fdfo.checkpoints import adapter_settings, latest_checkpoint
from fdfo.config import Config, Geometry
from fdfo.config_history import FREE_IF_PREDATED, with_added_defaults
from fdfo.prompts import recorded_path, replayed_path

# What a resumed run does with a setting that differs from the run's config.json (dotted config paths).
# Free: bookkeeping, batching, memory/speed options and logging; they change neither shapes nor what is optimised
# (batch sizes, compilation and checkpointing only change floating-point summation order).
RESUME_FREE = {"preset", "num_epochs", "save_freq", "resume_from", "run_dir", "run_name", "max_batch_size",
               "offload_text_encoders", "image_log_freq", "image_log_pairs", "log_wandb", "device",
               "sample.batch_size", "sample.decode_batch_size", "train.batch_size", "train.compile",
               "train.compile_scope", "train.cuda_graphs", "train.gradient_checkpointing", "train.rollout_device",
               "reward.chunk_size", "reward.vlm_fsdp", "reward.offload", "reward.overlap_preprocessing",
               "reward.remote_timeout", "reward.remote_retries",
               "eval.every", "eval.stop_after"}  # not what the held-out records measure (eval.prompts etc. are)
# Applied from the first resumed step and printed: optimizer hyperparameters (written into the restored optimizer's
# param_groups, which otherwise keep the saved values) and the step-wise clipping / KL settings read every step.
RESUME_APPLIED = {"train.learning_rate", "train.betas", "train.weight_decay", "train.eps", "train.max_grad_norm",
                  "train.clip_range", "train.kl_weight"}
# Everything else is refused: seed, pretrained_model, prompt_file, lora_rank, lora_alpha, total_pairs_per_epoch,
# gradient_steps_per_epoch, reward_preset, reward.specs / models, sample.num_solver_steps, resolution,
# guidance_scale, churn_schedule, churn_weight, train.precision, train.timesteps_per_sample (another estimator),
# train.fused_rms_norm and train.compute_dtype_modulation (the run's arithmetic, as train.precision), and
# any setting added later (safe default): each
# changes tensor shapes, the data or the reward, so the resumed run would no longer be the run its log describes.
# A setting that the run's config.json predates counts as its default of the day it was added (fdfo/config_history.py).


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolved_config(cfg: Config, geom: Geometry, run_dir: Path | None) -> dict:
    """The config as config.json records it (as it reads back from the file: tuples become lists)."""
    config = dataclasses.asdict(cfg) | {"geometry": dataclasses.asdict(geom), "run_dir": str(run_dir or cfg.run_dir),
                                        "prompt_file": recorded_path(cfg.prompt_file)}  # portable to another clone
    return json.loads(json.dumps(config))


def check_resume_settings(cfg: Config, geom: Geometry, resume: Path) -> list[str]:
    """Compare with the config.json of the run being resumed; refuse changes of shape or meaning (ValueError naming
    each, old -> new), return the lines describing the applied ones. See RESUME_FREE / RESUME_APPLIED above."""
    own = Path(cfg.run_dir) / "config.json" if cfg.run_dir is not None else None
    source = resume.parent.parent / "config.json"
    path = source if source.is_file() else own
    if path is None or not path.is_file():
        return []
    try:
        saved, predated = with_added_defaults(_flat(json.loads(path.read_text())))
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is damaged ({e.__class__.__name__}: {e}); it records the settings of the run being "
                         f"resumed. Restore it, or pass a new --run-dir to start a new run.") from None
    if isinstance(saved.get("prompt_file"), str):  # one spelling of the same file (older runs recorded it absolute)
        saved["prompt_file"] = recorded_path(replayed_path(saved["prompt_file"]))
    current = _flat(resolved_config(cfg, geom, None))
    changed = [k for k in current if k in saved and saved[k] != current[k] and not k.startswith("geometry.")
               and k not in RESUME_FREE and not (k in predated and k in FREE_IF_PREDATED)]
    refused = [f"{_flag(k)} {saved[k]!r}{' (the run predates this setting)' if k in predated else ''} -> "
               f"{current[k]!r}" for k in changed if k not in RESUME_APPLIED]
    if refused:
        raise ValueError(f"cannot resume {resume}: {len(refused)} setting(s) differ from {path} and would change the "
                         f"run's shapes or meaning: {'; '.join(refused)}. Rerun with the recorded values to continue "
                         f"that run, or pass a new --run-dir (and no --resume-from) to start a new one.")
    return [f"{_flag(k)} {saved[k]!r} -> {current[k]!r}" for k in changed]


def check_adapter_fits(cfg: Config, resume: Path) -> None:
    """A checkpoint of another LoRA rank / alpha cannot be loaded into this model: say so before loading anything."""
    found = adapter_settings(resume)
    wanted = {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
    bad = [f"{_flag(k)} {wanted[k]} (the checkpoint has {found[k]})" for k in wanted if found[k] != wanted[k]]
    if bad:
        raise ValueError(f"checkpoint {resume} does not fit: {', '.join(bad)}. Pass the checkpoint's values, or a new "
                         f"--run-dir without --resume-from to start a new run.")


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """A restored optimizer keeps the saved hyperparameters; the run uses the ones it was given (and records)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                     eps=cfg.train.eps)


def find_resume_point(cfg: Config) -> Path | None:
    """--resume-from, else the newest checkpoint of an existing --run-dir, else None (a fresh run)."""
    if cfg.resume_from is not None:
        return Path(cfg.resume_from)
    return latest_checkpoint(Path(cfg.run_dir)) if cfg.run_dir is not None else None
