"""When each setting of config.json appeared, so that a run made before a setting existed resumes as that run was.

A run's config.json records every setting of the version that made it. A key missing from it is a setting added
since: the run behaved as the setting's default of the day it was added (the value that kept the behaviour of the
version before), so a resume compares the current value with that default, like any recorded value
(fdfo/resume.py). Every setting is in exactly one of the two tables below; tests/test_resume_history.py fails until a
new setting is added to `ADDED_LATER` with its default, so nobody has to remember.
"""

from __future__ import annotations

# The settings of the first version that wrote config.json (commit 8ca0d84): every run's config.json has them.
FIRST_RECORDED = frozenset({
    "preset", "seed", "num_epochs", "save_freq", "resume_from", "run_dir", "run_name", "pretrained_model",
    "prompt_file", "lora_rank", "lora_alpha", "total_pairs_per_epoch", "gradient_steps_per_epoch", "max_batch_size",
    "reward_preset", "offload_text_encoders", "image_log_freq", "image_log_pairs", "log_wandb", "device",
    "sample.num_solver_steps", "sample.guidance_scale", "sample.resolution", "sample.batch_size",
    "sample.churn_schedule", "sample.churn_weight",
    "train.learning_rate", "train.betas", "train.weight_decay", "train.eps", "train.clip_range", "train.kl_weight",
    "train.batch_size", "train.max_grad_norm", "train.precision",
    "reward.specs", "reward.pickscore_model", "reward.pickscore_processor", "reward.clip_h14_model",
    "reward.clip_l14_model", "reward.hpsv2_model", "reward.vlm_model", "reward.chunk_size", "reward.vlm_fsdp",
    "reward.offload",
})

# Settings added since -> their default when added (as config.json writes it: JSON values), with the commit.
ADDED_LATER = {
    "train.compile": False,  # 83b9b8f
    "train.gradient_checkpointing": False,  # 83b9b8f
    "train.timesteps_per_sample": None,  # f724856
    "train.rollout_device": "auto",  # c9199a9
    "algorithm": "fdfo",  # 6ccf522
    "baseline.group_size": 24,  # 6ccf522
    "baseline.noise_level": 0.7,  # 6ccf522
    "baseline.nft_beta": 1.0,  # 6ccf522
    "baseline.ema_decay": 0.9,  # 6ccf522
    "reward.overlap_preprocessing": False,  # f03ae5b
    "reward.remote_timeout": 600.0,  # 1b23502
    "reward.remote_retries": 5,  # 1b23502
    "baseline.ema_interval": None,  # 2515c4d
    "reward.vlm_fp32_buffers": False,  # b902a8c
    "train.trust_region": "separation",  # 02e458c
    "sample.decode_batch_size": None,  # 93866ed (default 1 since 420e2c3; not compared on resume)
    "baseline.ema_blends": 1,  # 8a2257d
    "train.compile_scope": "blocks",  # 09025f5
    "train.cuda_graphs": False,  # 09025f5
    "train.fused_rms_norm": False,  # 09025f5
    "train.compute_dtype_modulation": False,  # 09025f5
    "eval.every": 0,  # bdf9cd3 (before it, no run evaluated held-out prompts; 10 by default since)
    "eval.num_prompts": 64,  # bdf9cd3
    "eval.prompts": "pickscore_test",  # bdf9cd3
    "eval.seed": 0,  # bdf9cd3
    "eval.metrics": [],  # bdf9cd3
    "eval.stop_after": 0,  # bdf9cd3
}

# Settings that only say how records the run has never written are made: a run that predates them takes today's
# values on resume (a run made before held-out evaluation has no held-out record its new ones must stay comparable
# with); a run that recorded them still refuses a change (fdfo/resume.py).
FREE_IF_PREDATED = frozenset({"eval.num_prompts", "eval.prompts", "eval.seed", "eval.metrics"})


def with_added_defaults(saved: dict) -> tuple[dict, set[str]]:
    """A flat (dotted keys) saved config with every setting it predates filled in with its default of the day;
    also the keys so filled."""
    missing = {key for key in ADDED_LATER if key not in saved}
    return {**{key: ADDED_LATER[key] for key in missing}, **saved}, missing
