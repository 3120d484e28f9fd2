"""VLM yes/no rewards (docs/algorithm.md §7-§8): Qwen2.5-VL asked a question about the image, scored by its answer.

The training reward (§7) resizes each float image to 504x504 with plain bilinear interpolation (no antialias) and
feeds it to the image processor with its resize and rescale off. The evaluation metrics (§8) instead hand the
8-bit image to the processor with its defaults (its own resize). Either way the image and the question go into the
model's chat template (one user turn: the image, then the text; then the assistant header). The score is
`100 * sigmoid(logit[Yes] - logit[No])` of the next-token logits at the last position. Sequences are left-padded,
so the last position is the same for all.

The inputs are built here from the tokenizer and the image processor: the stock `Qwen2_5_VLProcessor` /
`AutoProcessor` need torchvision for their video part. Building them by hand means we also supply
`mm_token_type_ids`, without which transformers silently falls back to 1-D positions instead of Qwen's 3-D M-RoPE.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import torch
import torch.nn.functional as F

from fdfo.images import to_uint8
from rewards.common import check_batch, chunk_slices, load_pretrained
from rewards.sharding import shard_vlm, synced_chunk_count

ALIGNMENT_QUESTION = 'Does this image match the caption "{prompt}"? Answer Yes or No.'  # §7, training reward
EVAL_ALIGNMENT_QUESTION = 'Does this image match the caption "{prompt}"? Answer with Yes or No.'  # §8, metric
QUALITY_QUESTION = "Is this image of professional quality? Answer with Yes or No."  # §8, metric vlm_quality
PHOTO_QUESTION = "Does this image look photorealistic? Answer with Yes or No."  # §8, metric vlm_photo
IMAGE_SIZE = 504  # §7; 36x36 patches of 14 px, 18x18 = 324 image tokens after the 2x2 merge
MAX_CAPTION_TOKENS = 512  # longer prompts keep their first 512 tokens (far beyond any Pick-a-Pic / HPDv2 prompt)


def yes_no_score(last_logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """docs/algorithm.md §7: `100 * sigmoid(logit[Yes] - logit[No])`. last_logits: `[B, V]`; returns float32 `[B]`."""
    logits = last_logits.float()
    return 100.0 * torch.sigmoid(logits[:, yes_id] - logits[:, no_id])


def resize_for_vlm(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """§7: plain bilinear resize (no antialias, align_corners False) of `[B, 3, H, W]` images in [0, 1] to
    `[B, 3, size, size]` float32."""
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def bf16_buffers_(model: torch.nn.Module) -> torch.nn.Module:
    """§7: the authors' training VLM runs under FSDP with a mixed-precision policy whose buffer dtype is bf16, also on
    one GPU, which casts every floating buffer to bf16: Qwen2.5-VL's rotary `inv_freq` (language model and vision
    tower) then holds bf16-rounded frequencies. Cast them in place the same way; returns `model`."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(torch.bfloat16)
    return model


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to `input_ids [B, L]` and `attention_mask [B, L]` (1 on real tokens)."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


def truncate_caption(tokenizer, caption: str, max_tokens: int = MAX_CAPTION_TOKENS) -> str:
    """The caption cut after its first `max_tokens` tokens, at a character boundary (unchanged if shorter)."""
    encoding = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding.input_ids) <= max_tokens:
        return caption
    return caption[: encoding.offset_mapping[max_tokens - 1][1]]


@dataclasses.dataclass
class VLMScorer:
    """Qwen2.5-VL yes/no scorer for one `question` ("{prompt}" in it is replaced by the caption).

    `with_question` gives another scorer that shares the loaded model. `processor_resize` False is the training
    reward's input path (504 bilinear, processor resize and rescale off); True is the evaluation metrics' (8-bit
    images, the processor's default resize and rescale). When `sharded`, the model is FSDP-sharded
    across ranks and every call is collective: all ranks must call it together (batch sizes may differ). Of the split
    `score(prepare(prompts, stage(images)))` (see rewards/weighted.py) only `score` is collective.
    """

    model: torch.nn.Module = dataclasses.field(repr=False)
    tokenizer: object = dataclasses.field(repr=False)
    image_processor: object = dataclasses.field(repr=False)
    question: str
    chunk_size: int
    chat_template: str | None = None  # None: the tokenizer's own
    sharded: bool = False
    max_caption_tokens: int = MAX_CAPTION_TOKENS
    processor_resize: bool = False

    def __post_init__(self):
        self.image_token_id = self.model.config.image_token_id
        self.yes_id, self.no_id = (_single_token_id(self.tokenizer, word) for word in ("Yes", "No"))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        if IMAGE_SIZE % factor:
            raise ValueError(f"The VLM's image processor needs sizes divisible by {factor}; {IMAGE_SIZE} is not.")

    @classmethod
    def load(
        cls, model_id: str, *, device: torch.device | str, chunk_size: int, question: str, fsdp: bool = False,
        bf16_buffers: bool = False,
    ) -> "VLMScorer":
        """Load tokenizer, image processor and model (bf16 on CUDA, fp32 otherwise) from a hub id or a folder.

        With `fsdp` the model is read to CPU and then sharded across ranks (see `rewards.sharding`). bf16_buffers:
        the training reward's buffers in bf16, as the authors' FSDP mixed-precision policy makes them
        (`bf16_buffers_`); the evaluation metrics keep them in fp32.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model_id, "vlm_model", "VLM tokenizer")
        image_processor = load_pretrained(AutoImageProcessor.from_pretrained, model_id, "vlm_model", "VLM processor")
        chat_template = None if tokenizer.chat_template else _processor_chat_template(model_id)
        model = load_pretrained(
            lambda path: Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype),
            model_id,
            "vlm_model",
            "VLM",
        ).eval()
        if bf16_buffers:
            bf16_buffers_(model)
        model = shard_vlm(model, device) if fsdp else model.to(device)
        return cls(model, tokenizer, image_processor, question, chunk_size, chat_template, sharded=fsdp)

    def with_question(self, question: str, processor_resize: bool | None = None) -> "VLMScorer":
        """A scorer sharing this model that asks `question` (and, if given, uses that input path)."""
        resize = self.processor_resize if processor_resize is None else processor_resize
        return dataclasses.replace(self, question=question, processor_resize=resize)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def to(self, device: torch.device | str) -> "VLMScorer":
        """Move the model (shared by every `with_question` copy). A sharded model stays where FSDP put it."""
        if not self.sharded:
            self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 100], float32 `[B]` on `images.device`, for `B` prompts and images `[B, 3, H, W]`."""
        check_batch(prompts, images)
        return self.score(self.prepare(prompts, self.stage(images))).to(images.device)

    def stage(self, images: torch.Tensor) -> torch.Tensor:
        """The device-side part of the preprocessing, where `images` is: §7 the 504 px bilinear resize (float32),
        §8 the rounding to 8 bits (uint8). `prepare` reads it on the host."""
        return to_uint8(images.detach()) if self.processor_resize else resize_for_vlm(images.detach())

    @torch.no_grad()
    def prepare(self, prompts: Sequence[str], staged: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The CPU part for `stage(images)` (on the host or the device): `host_inputs` per chunk of `chunk_size`.
        No model, no device work, no collective, no randomness: safe to run in a worker thread."""
        return [self.host_inputs(list(prompts[s]), staged[s]) for s in chunk_slices(len(prompts), self.chunk_size)]

    @torch.no_grad()
    def score(self, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The model forwards of `prepare`'s chunks: float32 `[B]` on the model's device. Collective when sharded."""
        # FSDP all-gathers weights in every forward, so all ranks must run equally many: agree first, then pad.
        extra = synced_chunk_count(len(inputs), self.device) - len(inputs) if self.sharded else 0
        scores = [self._score_chunk(chunk) for chunk in inputs]
        for _ in range(extra):
            self._score_chunk(self.build_inputs([""], torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)))
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32, device=self.device)

    def _score_chunk(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits
        return yes_no_score(logits[:, -1], self.yes_id, self.no_id)

    def build_inputs(self, prompts: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs (on CPU) for a chunk of float images `[B, 3, H, W]`: `host_inputs(prompts, stage(images))`."""
        return self.host_inputs(prompts, self.stage(images))

    def host_inputs(self, prompts: Sequence[str], staged: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs (on CPU) for a chunk of `stage`d images: `input_ids`, `attention_mask`, `mm_token_type_ids`
        `[B, L]` (left padded), `pixel_values` `[B * patches, patch_dim]` and `image_grid_thw` `[B, 3]`."""
        if self.processor_resize:  # §8: 8-bit images through the processor's own resize and rescale
            vision = self.image_processor(
                images=list(staged.cpu()), input_data_format="channels_first", return_tensors="pt"
            )
        else:  # §7: already 504x504, a multiple of the patch grid, so no second (8-bit PIL) resize
            vision = self.image_processor(
                images=list(staged.cpu()),
                do_resize=False,
                do_rescale=False,
                input_data_format="channels_first",
                return_tensors="pt",
            )
        tokens_per_image = (vision.image_grid_thw.prod(-1) // self.image_processor.merge_size**2).tolist()
        sequences = [self._prompt_ids(prompt, count) for prompt, count in zip(prompts, tokens_per_image)]
        input_ids, attention_mask = left_pad(sequences, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),  # 1 = image token, 0 = text
            "pixel_values": vision.pixel_values,
            "image_grid_thw": vision.image_grid_thw,
        }

    def _prompt_ids(self, prompt: str, image_tokens: int) -> list[int]:
        """Token ids of the chat for one prompt, the image placeholder expanded to `image_tokens` copies."""
        text = self.question.replace("{prompt}", truncate_caption(self.tokenizer, prompt, self.max_caption_tokens))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        ids = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            sanitize_control_tokens=True,  # a prompt containing e.g. "<|image_pad|>" stays plain text
            return_dict=False,
        )
        slots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(slots) != 1:
            raise ValueError(f"The VLM chat template must place one image placeholder per image, found {len(slots)}.")
        return ids[: slots[0]] + [self.image_token_id] * image_tokens + ids[slots[0] + 1 :]


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"The VLM tokenizer splits {word!r} into {len(ids)} tokens; the yes/no score needs one.")
    return ids[0]


def _processor_chat_template(model_id: str) -> str:
    """The chat template that some repositories keep only in the processor's `chat_template.json`/`.jinja`."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False)
        if path:
            with open(path, encoding="utf-8") as handle:
                return handle.read() if name.endswith(".jinja") else json.load(handle)["chat_template"]
    raise ValueError(f"The VLM {model_id!r} has no chat template (tokenizer config or chat_template.json/.jinja).")
