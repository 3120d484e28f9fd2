"""CLIP-family rewards (docs/algorithm.md §7-§8): PickScore, HPSv2, CLIP ViT-H/14 and CLIP ViT-L/14.

All four score an (image, prompt) pair as `exp(logit_scale) * cos(text_embedding, image_embedding)` with the
checkpoint's own `logit_scale`, in fp32, the prompt truncated at 77 tokens. PickScore and HPSv2 take their processor
from the laion ViT-H/14 repository (both are fine-tunes of that model and use its preprocessing); the two plain CLIP
metrics use their own repository's processor.

Images reach the model one of two ways. The training reward (§7) preprocesses the float images on their device with
`clip_preprocess`: what the processor's torchvision backend computes on float input (bicubic resize with antialias,
centre crop, CLIP normalisation), whether or not torchvision is installed, and never through 8 bits. The evaluation
metrics (§8) score 8-bit images and hand them to the processor itself.
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


# docs/algorithm.md §7: CLIPImageProcessor's torchvision backend on float input, written out with torch alone.
def clip_preprocess(images: torch.Tensor, shortest_edge: int, crop: tuple[int, int], mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """Float images `[B, 3, H, W]` in [0, 1] -> CLIP `pixel_values` `[B, 3, crop_h, crop_w]` float32, where `images` is.

    Bicubic resize with antialias (align_corners False) so that the short side is `shortest_edge` and the long side
    `int(shortest_edge * long / short)`; centre crop at top `int((h - crop_h) / 2)`, left likewise; `(x - mean) / std`
    per channel. No 8-bit step and no clamp after the resize (the bicubic kernel may overshoot [0, 1] slightly).
    """
    images = images.float()
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    crop_h, crop_w = crop
    if crop_h > size[0] or crop_w > size[1]:
        raise ValueError(f"CLIP preprocessing: a {crop_h}x{crop_w} crop does not fit a {size[0]}x{size[1]} image")
    top, left = int((size[0] - crop_h) / 2.0), int((size[1] - crop_w) / 2.0)
    images = images[..., top:top + crop_h, left:left + crop_w]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


class CLIPScorer:
    """A `CLIPModel` + `CLIPProcessor` scoring `exp(logit_scale) * cos` per (prompt, image) pair.

    float_preprocessing True (the training reward, §7): `clip_preprocess` on the device with the processor's sizes,
    mean and std. False (the evaluation metrics, §8): the images go to the processor as float [0, 1] arrays with
    `do_rescale=False`; without torchvision transformers uses its PIL image processor, whose resize works on an
    8-bit copy (exact for the metrics' 8-bit images). Either way scores are deterministic and independent of batching.
    """

    def __init__(self, model, processor, chunk_size: int, float_preprocessing: bool = False):
        self.model = model.float().eval()
        self.processor = processor
        self.chunk_size = chunk_size
        self.float_preprocessing = float_preprocessing

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
        float_preprocessing: bool = False,
    ) -> "CLIPScorer":
        """Load from hub ids or folders; `*_option` name the `RewardConfig` fields for the not-found message.
        float_preprocessing: the training reward's on-device float path (see the class)."""
        from transformers import CLIPModel, CLIPProcessor

        processor = load_pretrained(CLIPProcessor.from_pretrained, processor_id, processor_option, f"{what} processor")
        model = load_pretrained(
            lambda path: CLIPModel.from_pretrained(path, dtype=torch.float32), model_id, model_option, f"{what} model"
        )
        return cls(model.to(device), processor, chunk_size, float_preprocessing)

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
        """The device-side part of the preprocessing, where `images` is: float32 clamped to [0, 1], and with
        float_preprocessing the whole `clip_preprocess` (`pixel_values`); `prepare` reads it on the host."""
        images = images.detach().float().clamp(0, 1)
        if not self.float_preprocessing:
            return images
        ip = self.processor.image_processor
        crop = (ip.crop_size["height"], ip.crop_size["width"])
        return clip_preprocess(images, ip.size["shortest_edge"], crop, ip.image_mean, ip.image_std)

    @torch.no_grad()
    def prepare(self, prompts: Sequence[str], staged: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The CPU part for `stage(images)` (on the host or the device): per chunk of `chunk_size`, the `pixel_values`
        (the processor's, on CPU; with float_preprocessing the staged ones, where they are) and the tokenizer's
        `input_ids` / `attention_mask`. No model, no device work, no randomness: safe to run in a worker thread."""
        return [self._chunk_inputs(list(prompts[s]), staged[s]) for s in chunk_slices(len(prompts), self.chunk_size)]

    @torch.no_grad()
    def score(self, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The model forwards of `prepare`'s chunks: float32 `[B]` on the model's device."""
        scores = [self._score_chunk(chunk) for chunk in inputs]
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32, device=self.device)

    def _chunk_inputs(self, prompts: list[str], staged: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.float_preprocessing:  # already the pixel values
            pixels = staged
        else:
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
