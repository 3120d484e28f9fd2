"""The bench's PickScore-shaped reward (`python -m fdfo.bench --reward pickscore`): no download, real code path.

PickScore_v1 is a fine-tune of laion's CLIP ViT-H/14, so its cost is that architecture's: a random-init
`transformers.CLIPModel` of that config in fp32 (as rewards/clip.py loads it), a processor with the ViT-H/14
processor's settings and the project's small offline CLIP tokenizer (fdfo/models/tiny_text.py), wrapped in the
repository's own `rewards.clip.CLIPScorer` inside a `rewards.WeightedReward`, so that sample_phase runs the real
stage / prepare / score steps (and `--reward.overlap-preprocessing`). The scores are meaningless; the timing is the
real one.
"""

from __future__ import annotations

import torch

# CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the base of PickScore_v1), as transformers' CLIPConfig.
# Sources: open_clip's src/open_clip/model_configs/ViT-H-14.json (embed_dim 1024; vision: image 224, 32 layers,
# width 1280, head_width 80 = 16 heads, patch 14, MLP ratio 4 = 5120; text: context 77, vocab 49408, width 1024,
# 16 heads, 24 layers, MLP 4096), and the transformers-format configs of that checkpoint (e.g. ComfyUI's
# clip_vision_config_h.json: hidden_act "gelu", layer_norm_eps 1e-5; the text tower's "gelu" likewise). Parameter
# count in open_clip's docs/model_profile.csv: 986.11 M (image tower 632.08 M, text tower 354.03 M);
# tests/test_bench.py checks this config against those numbers.
VIT_H14_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
VIT_H14_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)
VIT_H14_PROJECTION = 1024

# --tiny: the sizes of the test suite's tiny CLIP (2 layers, width 32, 32 px crop, projection 16), fast on CPU.
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8)
TINY_PROJECTION = 16

LOGIT_SCALE = 4.6052  # ln(100): PickScore's learned temperature, about; it only scales the random scores


def clip_config(tiny: bool, tokenizer):
    """`CLIPConfig` of ViT-H/14 (or the tiny one) whose special token ids are `tokenizer`'s. The text tower pools at
    the end-of-text token; the tiny tokenizer gives it the highest id, as CLIP's own vocabulary does."""
    from transformers import CLIPConfig

    text, vision, projection = (TINY_TEXT, TINY_VISION, TINY_PROJECTION) if tiny else (
        VIT_H14_TEXT, VIT_H14_VISION, VIT_H14_PROJECTION)
    text = dict(text, vocab_size=len(tokenizer)) if tiny else dict(text)
    assert len(tokenizer) <= text["vocab_size"], (len(tokenizer), text["vocab_size"])
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id)
    return CLIPConfig(text_config=text, vision_config=dict(vision), projection_dim=projection,
                      logit_scale_init_value=LOGIT_SCALE)


def clip_processor(tiny: bool, tokenizer):
    """A `CLIPProcessor` with the ViT-H/14 preprocessing (resize the shortest edge to 224 bicubic, centre crop 224,
    CLIP mean / std; laion's preprocessor_config.json) or the same at the tiny crop. Its backend is the one
    `CLIPProcessor.from_pretrained` picks for the real checkpoints: torchvision when installed, else PIL."""
    from transformers import CLIPProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor as ImageProcessor
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    side = (TINY_VISION if tiny else VIT_H14_VISION)["image_size"]
    image_processor = ImageProcessor(
        do_resize=True, size={"shortest_edge": side}, resample=PILImageResampling.BICUBIC, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def clip_model(tiny: bool, tokenizer, device: torch.device | str, seed: int = 0):
    """Random-init fp32 `CLIPModel`, created directly on `device` ("meta": no memory); seeded without touching the
    caller's random state."""
    from transformers import CLIPModel

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            return CLIPModel(clip_config(tiny, tokenizer)).float().eval().requires_grad_(False)


def pickscore_reward(tiny: bool, device: torch.device, chunk_size: int):
    """`WeightedReward` of one PickScore-shaped term (weight 1), its CLIP on `device`."""
    from fdfo.models.tiny_text import tiny_clip_tokenizer
    from rewards import Term, WeightedReward
    from rewards.clip import CLIPScorer

    tokenizer = tiny_clip_tokenizer()
    scorer = CLIPScorer(clip_model(tiny, tokenizer, device), clip_processor(tiny, tokenizer), chunk_size)
    return WeightedReward([Term("pickscore", 1.0, scorer)], device)


def count_flops(tiny: bool, prompts: list[str]) -> dict[str, float]:
    """FLOPs of the scorer's CLIP forwards, counted without weights (meta device) as fdfo.bench.flops.count_flops counts
    the transformer: the image tower (+ projection) per image at the crop size, and the text tower (+ projection) per
    prompt at the length of `prompts` padded together (the scorer pads each chunk to its longest prompt)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fdfo.models.tiny_text import tiny_clip_tokenizer
    from rewards.clip import CLIP_MAX_TOKENS

    tokenizer = tiny_clip_tokenizer()
    model = clip_model(tiny, tokenizer, "meta")
    side = model.config.vision_config.image_size
    ids = tokenizer(prompts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad(), FlopCounterMode(display=False) as image:
        model.get_image_features(pixel_values=torch.zeros(1, 3, side, side, device="meta"))
    with torch.no_grad(), FlopCounterMode(display=False) as text:
        # no attention mask: transformers reads its values to build the causal mask, and meta tensors have none;
        # the attention FLOPs do not depend on the mask
        model.get_text_features(input_ids=ids.to("meta"))
    return {"reward_image": float(image.get_total_flops()),
            "reward_text_per_prompt": float(text.get_total_flops()) / len(prompts)}
