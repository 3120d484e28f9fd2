"""Reward options, nested as `--reward.*` in train.py and metrics.py."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RewardConfig:
    """Which reward models to load and how to run them. Every model option takes a hub id or a local folder."""

    specs: tuple[str, ...] = ()
    """Custom reward terms overriding the preset, each "kind:weight" or "kind:weight:question", e.g. \
"pickscore:1.0" "vlm_alignment:0.1". Kinds: pickscore, hpsv2, clip_h14, clip_l14, vlm_alignment, vlm_quality, \
vlm_photo, vlm (needs a question), brightness, redness. A VLM question may contain {prompt}, replaced by the caption. \
Your own reward: "plugin:0.5:my_rewards.py:Aesthetic" or "plugin:0.5:my_pkg.rewards:Aesthetic"; a reward server \
(python -m rewards.serve): "remote:1.0:http://127.0.0.1:8000" (docs/rewards.md)."""

    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """PickScore CLIP model (hub id or local folder)."""

    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """Processor (tokenizer + image preprocessing) for PickScore and HPSv2 (hub id or local folder)."""

    clip_h14_model: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """CLIP ViT-H/14 for the clip_h14 metric; its own processor is used (hub id or local folder)."""

    clip_l14_model: str = "openai/clip-vit-large-patch14"
    """CLIP ViT-L/14 for the clip_l14 metric; its own processor is used (hub id or local folder)."""

    hpsv2_model: str = "adams-story/HPSv2-hf"
    """HPSv2 CLIP model for the hpsv2 metric (hub id or local folder)."""

    vlm_model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Qwen2.5-VL model for the VLM yes/no rewards, e.g. Qwen/Qwen2.5-VL-3B-Instruct (hub id or local folder)."""

    chunk_size: int = 16
    """Images scored per forward pass of each reward model (lower it if a scorer runs out of memory)."""

    vlm_fsdp: bool | None = None
    """Shard the VLM with FSDP across ranks to save memory; default: on when the world size is > 1 (a single \
process never shards). With sharding, all ranks score together and the VLM is not offloaded."""

    vlm_fp32_buffers: bool = False
    """Training reward only: keep the VLM's buffers (the rotary inv_freq) in fp32. Default: bf16, as the authors' \
FSDP mixed-precision policy makes them in training (their evaluation VLM, and metrics.py here, keep fp32)."""

    offload: bool = False
    """Move the reward models to CPU between scoring phases (they come back on the next scoring call)."""

    remote_timeout: float = 600.0
    """Seconds within which a remote: reward server's whole answer to one request of --reward.chunk-size images must
arrive (a deadline, not only silence); a later one is retried like a transport error."""

    remote_retries: int = 5
    """Retries of a remote: request after a transport error (refused or reset connection, an answer cut short or past \
its deadline) or HTTP 503 (waiting 1, 2, 4, ... s, at most 30 s each); a server still down after them stops the run \
like a pre-emption (rerun to resume)."""

    overlap_preprocessing: bool = False
    """Training only: run the reward models' CPU preprocessing of each sampling batch (device-to-host copy, image \
processor, tokenizer) in a worker thread while the next batch is sampled, and score it then. Same numbers; it hides \
the CPU time during which the GPU would otherwise wait. train.py only (metrics.py refuses it)."""
