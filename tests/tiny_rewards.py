"""Tiny offline reward models of the real architectures, test fixtures (not part of the runtime package).

Each builder makes the real transformers classes (`CLIPModel` + `CLIPProcessor`, `Qwen2_5_VLForConditionalGeneration`
+ a Qwen2 BPE tokenizer with the Qwen special tokens and a chat template + the Qwen2-VL image processor), only shrunk,
and writes them with `save_pretrained`, so the scorers load them through the same `from_pretrained` calls as the real
checkpoints. `build_fake_hf_cache` lays such folders out as a Hugging Face hub cache under the real repository ids, so
that `from_pretrained("yuvalkirstain/PickScore_v1")` resolves offline (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE=<dir>`).

Everything is seeded and built without downloads; the whole set takes a few seconds on two CPU cores.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import pathlib
from typing import Callable, Mapping

import torch

TINY_CLIP_IMAGE_SIZE = 32  # processor crop size = vision tower input size
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen chat format (system turn added when missing, image placeholder inside the user turn, assistant header as
# generation prompt), written for this project as a small Jinja template.
TINY_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_CORPUS = (
    "You are a helpful assistant.",
    'Does this image match the caption "a photo of a cat"? Answer Yes or No.',
    "Is this image of professional quality?",
    "Does this image look photorealistic?",
    "a photo of a red car parked on a street at night",
    "an oil painting of a small wooden boat on a quiet lake",
    "Yes",
    "No",
)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP (PickScore, HPSv2, CLIP H/14 and L/14 share this architecture)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from fdfo.models.tiny_text import tiny_clip_tokenizer

    return tiny_clip_tokenizer()  # ~1 s to train: built once per process, handed out as copies


def tiny_clip_processor():
    """`CLIPProcessor`: the project's tiny CLIP BPE tokenizer (77 tokens) + a PIL image processor cropping to 32 px."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = TINY_CLIP_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=copy.deepcopy(_clip_tokenizer()))


def tiny_clip_model(seed: int = 0, logit_scale: float = math.log(100.0)):
    """A seeded 2-layer `CLIPModel` (text width 32, vision width 32, projection 16) matching `tiny_clip_processor`.

    `logit_scale` is stored in log space as in real checkpoints; PickScore's is about ln(100).
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _clip_tokenizer()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={**small, "image_size": TINY_CLIP_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
        logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def save_tiny_clip(folder: str | pathlib.Path, seed: int = 0, with_processor: bool = True) -> pathlib.Path:
    """Write a tiny CLIP model (and, unless `with_processor=False`, its processor) to `folder`; returns the folder.

    PickScore_v1 is saved without a processor so a test notices if the scorer read it from the model id instead of
    the laion processor id.
    """
    folder = pathlib.Path(folder)
    tiny_clip_model(seed).save_pretrained(folder)
    if with_processor:
        tiny_clip_processor().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL


def tiny_qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer (~330 tokens) with the Qwen special tokens and a chat template.

    Trained in-process on a few sentences with the real Qwen2 pre-tokeniser; "Yes" and "No" are single tokens, as in
    the real vocabulary. Deterministic.
    """
    from tokenizers import AddedToken, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Qwen2Tokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        special_tokens=list(QWEN_SPECIAL_TOKENS),
    )
    backend.train_from_iterator(list(_QWEN_CORPUS) * 20, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS])
    for word in ("Yes", "No"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    return tokenizer


def tiny_qwen_image_processor():
    """The Qwen2-VL PIL image processor with the real patch geometry (14 px patches, 2x2 merge, 2 frames)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)


def tiny_qwen_vl_model(tokenizer, seed: int = 0, tie_word_embeddings: bool = False):
    """A seeded 2-layer `Qwen2_5_VLForConditionalGeneration` (text width 64, vision width 32) for `tokenizer`.

    `tie_word_embeddings=True` shares the input embedding with the LM head, as Qwen2.5-VL-3B does (7B does not).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    )}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=tie_word_embeddings,
        **ids,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_tiny_qwen_vl(folder: str | pathlib.Path, seed: int = 0, tie_word_embeddings: bool = False) -> pathlib.Path:
    """Write a tiny Qwen2.5-VL model, its tokenizer (with chat template) and image processor to `folder`."""
    folder = pathlib.Path(folder)
    tokenizer = tiny_qwen_tokenizer()
    tiny_qwen_vl_model(tokenizer, seed, tie_word_embeddings).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tiny_qwen_image_processor().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Fake Hugging Face cache

Builder = Callable[[pathlib.Path], object]


def tiny_reward_repos() -> dict[str, Builder]:
    """Builders for every default reward model id of `RewardConfig`, each writing a tiny stand-in into a folder."""
    return {
        "yuvalkirstain/PickScore_v1": functools.partial(save_tiny_clip, seed=1, with_processor=False),
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": functools.partial(save_tiny_clip, seed=2),
        "openai/clip-vit-large-patch14": functools.partial(save_tiny_clip, seed=3),
        "adams-story/HPSv2-hf": functools.partial(save_tiny_clip, seed=4, with_processor=False),
        "Qwen/Qwen2.5-VL-7B-Instruct": functools.partial(save_tiny_qwen_vl, seed=5),
    }


def build_fake_hf_cache(cache_dir: str | pathlib.Path, repos: Mapping[str, Builder] | None = None) -> pathlib.Path:
    """Lay out `repos` ({"org/name": builder}) as a hub cache in `cache_dir`; returns `cache_dir`.

    Each repository becomes `models--org--name/refs/main` (a commit hash) and `models--org--name/snapshots/<hash>/`
    filled by `builder(snapshot_folder)`. Point `HF_HUB_CACHE` at `cache_dir` and set `HF_HUB_OFFLINE=1` *before*
    importing transformers / huggingface_hub (they read both at import), e.g. in a subprocess. Default repos:
    `tiny_reward_repos()`.
    """
    cache_dir = pathlib.Path(cache_dir)
    for repo_id, build in (tiny_reward_repos() if repos is None else repos).items():
        org, name = repo_id.split("/")
        commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex string; fixed so rebuilds are stable
        root = cache_dir / f"models--{org}--{name}"
        build(root / "snapshots" / commit)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return cache_dir
