"""The models the bench does not load but a training run keeps on the GPU while it samples: SD3.5-Medium's three text
encoders (in the pipeline's bf16) and the PickScore model (fp32, as rewards/clip.py loads it).

`python -m fdfo.bench --hold-side-models` holds a device buffer of their exact size through each sampling phase and
frees it before training, as `--preset lowmem24` parks them on the CPU while training; so a memory cap
(`--memory-fraction`) sees the sampling-phase weights of a real run, not only the transformer's. Sizes are counted
on the meta device from the published configurations (no download, no memory).
"""

from __future__ import annotations

import contextlib
import math

import torch

# SD3.5-Medium's text encoders (the text_encoder / text_encoder_2 / text_encoder_3 folders of
# stabilityai/stable-diffusion-3.5-medium, the same as SD3-Medium's): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
# towers with projections, and the T5 v1.1 XXL encoder. Parameter counts: 123,650,304 + 694,659,840 +
# 4,762,310,656 (tests/test_bench.py derives them by hand from these numbers).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
# --tiny: the same kinds at widths of a few dozen (fast on CPU; the numbers only need to be small)
_SMALL = dict(num_hidden_layers=2, num_attention_heads=2)
TINY = (CLIP_L | _SMALL | dict(hidden_size=32, intermediate_size=64, projection_dim=32),
        CLIP_G | _SMALL | dict(hidden_size=48, intermediate_size=96, projection_dim=48),
        dict(T5_XXL, d_model=96, d_kv=16, d_ff=192, num_layers=2, num_heads=2))


def text_encoders(tiny: bool) -> list[torch.nn.Module]:
    """The three text encoders on the meta device (no weights)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l, clip_g, t5 = TINY if tiny else (CLIP_L, CLIP_G, T5_XXL)
    with torch.device("meta"):
        return [CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
                T5EncoderModel(T5Config(**t5, tie_word_embeddings=False))]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


def side_model_bytes(tiny: bool, with_pickscore: bool) -> dict[str, int]:
    """Bytes a training run keeps on the GPU while sampling beside what the bench loads: the text encoders in bf16
    and, when `with_pickscore` (the bench's stub reward stands in for it), PickScore in fp32."""
    sizes = {"text_encoders": 2 * sum(parameter_count(m) for m in text_encoders(tiny))}
    if with_pickscore:
        from fdfo.bench.reward import clip_model
        from fdfo.models.tiny_text import tiny_clip_tokenizer

        sizes["pickscore"] = 4 * parameter_count(clip_model(tiny, tiny_clip_tokenizer(), "meta"))
    return sizes


@contextlib.contextmanager
def holding(nbytes: int, device: torch.device):
    """`nbytes` of `device` memory taken for the duration of the block (nothing when 0); freed when it ends. The
    local keeps the buffer alive: a `with` without `as` drops what the block is handed at once."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    yield buffer
