"""CLIP-family rewards (docs/algorithm.md §7-§8): PickScore, HPSv2, CLIP ViT-H/14 and CLIP ViT-L/14.

All four score an (image, prompt) pair as `exp(logit_scale) * cos(text_embedding, image_embedding)` with the
checkpoint's own `logit_scale`, in fp32, the prompt truncated at 77 tokens. PickScore and HPSv2 take their processor
from the laion ViT-H/14 repository (both are fine-tunes of that model and use its preprocessing); the two plain CLIP
metrics use their own repository's processor.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from rewards.common import check_batch, chunk_slices, load_pretrained

CLIP_MAX_TOKENS = 77


def clip_score(text_embeds: torch.Tensor, image_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """docs/algorithm.md §7: `exp(logit_scale) * cos(text, image)` row by row.

    text_embeds, image_embeds: `[B, D]` projected (unnormalised) embeddings; logit_scale: scalar (log space).
    Returns float32 `[B]`.
    """
    text = F.normalize(text_embeds.float(), dim=-1)
    image = F.normalize(image_embeds.float(), dim=-1)
    return logit_scale.float().exp() * (text * image).sum(dim=-1)


class CLIPScorer:
    """A `CLIPModel` + `CLIPProcessor` scoring `exp(logit_scale) * cos` per (prompt, image) pair.

    Images go to the processor as float [0, 1] arrays with `do_rescale=False`. Without torchvision transformers
    uses its PIL image processor, whose resize step works on an 8-bit copy of the image; that rounding is the same
    for every call, so scores stay deterministic and independent of batching.
    """

    def __init__(self, model, processor, chunk_size: int):
        self.model = model.float().eval()
        self.processor = processor
        self.chunk_size = chunk_size

    @classmethod
    def load(
        cls,
        model_id: str,
        processor_id: str,
        *,
        device: torch.device | str,
        chunk_size: int,
        model_option: str,
        processor_option: str,
        what: str,
    ) -> "CLIPScorer":
        """Load from hub ids or folders; `*_option` name the `RewardConfig` fields for the not-found message."""
        from transformers import CLIPModel, CLIPProcessor

        processor = load_pretrained(CLIPProcessor.from_pretrained, processor_id, processor_option, f"{what} processor")
        model = load_pretrained(
            lambda path: CLIPModel.from_pretrained(path, dtype=torch.float32), model_id, model_option, f"{what} model"
        )
        return cls(model.to(device), processor, chunk_size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: torch.device | str) -> "CLIPScorer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """Scores `[B]` (float32, on `images.device`) for `B` prompts and float images `[B, 3, H, W]` in [0, 1]."""
        check_batch(prompts, images)
        return self.score(self.prepare(prompts, self.stage(images))).to(images.device)

    def stage(self, images: torch.Tensor) -> torch.Tensor:
        """The device-side part of the preprocessing: `[B, 3, H, W]` float32 clamped to [0, 1], where `images` is;
        `prepare` reads it on the host."""
        return images.detach().float().clamp(0, 1)

    @torch.no_grad()
    def prepare(self, prompts: Sequence[str], staged: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The CPU part for `stage(images)` (on the host or the device): per chunk of `chunk_size`, the processor's
        `pixel_values` and the tokenizer's `input_ids` / `attention_mask`, on CPU. No model, no device work, no
        randomness: safe to run in a worker thread."""
        return [self._chunk_inputs(list(prompts[s]), staged[s]) for s in chunk_slices(len(prompts), self.chunk_size)]

    @torch.no_grad()
    def score(self, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The model forwards of `prepare`'s chunks: float32 `[B]` on the model's device."""
        scores = [self._score_chunk(chunk) for chunk in inputs]
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32, device=self.device)

    def _chunk_inputs(self, prompts: list[str], staged: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = self.processor.image_processor(
            images=list(staged.cpu()),
            do_rescale=False,
            input_data_format="channels_first",
            return_tensors="pt",
        ).pixel_values
        text = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt"
        )
        return {"pixel_values": pixels, "input_ids": text.input_ids, "attention_mask": text.attention_mask}

    def _score_chunk(self, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        image_embeds = self.model.get_image_features(pixel_values=chunk["pixel_values"].to(self.device)).pooler_output
        text_embeds = self.model.get_text_features(
            input_ids=chunk["input_ids"].to(self.device), attention_mask=chunk["attention_mask"].to(self.device)
        ).pooler_output
        return clip_score(text_embeds, image_embeds, self.model.logit_scale)
