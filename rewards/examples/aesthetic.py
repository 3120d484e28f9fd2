"""An aesthetic score: the LAION "improved aesthetic predictor" MLP on CLIP ViT-L/14 image embeddings.

    python train.py --reward.specs "pickscore:1.0" "plugin:0.5:rewards/examples/aesthetic.py:Aesthetic"

The image is rounded to 8 bits, preprocessed by the CLIP processor, embedded by CLIP ViT-L/14
(`openai/clip-vit-large-patch14`), L2-normalised and scored by a 5-layer MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1,
no activations, as the published head). The head's weights come from the hub (`trl-lib/ddpo-aesthetic-predictor`,
file `aesthetic-model.pth`, the head TRL's DDPO example uses), read with `torch.load(weights_only=True)` (a plain
tensor dict, no code) or, for a `.safetensors` file, with safetensors. Both ids may also be local folders. Scores
are on the predictor's 1-10 scale. To use another CLIP or head, subclass and change the class attributes.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

HIDDEN = (1024, 128, 64, 16)


class AestheticHead(nn.Module):
    """`[B, D]` normalised embeddings -> `[B]`: Linear layers D -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout between the
    first four in training, nothing at inference), keys `layers.{0,2,4,6,7}` as in the published state dict."""

    def __init__(self, dim: int):
        super().__init__()
        sizes = (dim, *HIDDEN)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < 3:
                layers.append(nn.Dropout(0.1 if i == 2 else 0.2))
        layers.append(nn.Linear(HIDDEN[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def head_file(repo: str, filename: str) -> str:
    """The head's weight file: `repo/filename` for a local folder, else from the Hugging Face hub (cache first)."""
    if os.path.isdir(repo):
        return os.path.join(repo, filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never code


class Aesthetic:
    """`(prompts, images [B, 3, H, W] in [0, 1]) -> [B]` aesthetic scores, float32 on the images' device."""

    name = "aesthetic"
    clip_model = "openai/clip-vit-large-patch14"
    head_repo = "trl-lib/ddpo-aesthetic-predictor"
    head_filename = "aesthetic-model.pth"

    def __init__(self, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.processor = CLIPProcessor.from_pretrained(self.clip_model)
            self.clip = CLIPModel.from_pretrained(self.clip_model, dtype=torch.float32).eval()
            state = load_state(head_file(self.head_repo, self.head_filename))
        except OSError as err:  # not in the cache and no download possible: say what to fetch
            raise FileNotFoundError(f"the aesthetic reward needs {self.clip_model} and {self.head_repo} (file "
                                    f"{self.head_filename}): fetch them with `hf download <id>`, or subclass "
                                    f"Aesthetic with local folders ({type(err).__name__}: {err})") from err
        self.head = AestheticHead(self.clip.config.projection_dim).eval()
        self.head.load_state_dict(state)
        self.to(device)

    def to(self, device: torch.device | str) -> Aesthetic:
        self.clip.to(device)
        self.head.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        pixels = (images.detach().float() * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
        inputs = self.processor.image_processor(images=list(pixels), input_data_format="channels_first",
                                                return_tensors="pt").pixel_values
        device = self.head.layers[0].weight.device
        embeds = self.clip.get_image_features(pixel_values=inputs.to(device)).pooler_output.float()
        scores = self.head(nn.functional.normalize(embeds, dim=-1))
        return scores.float().to(images.device)
