"""JPEG compressibility (the classic DDPO reward): minus the size of the image as a quality-95 JPEG, in kB.

    python train.py --reward.specs "plugin:1.0:rewards/examples/jpeg.py:JpegCompressibility"

No model: Pillow encodes each 8-bit image (the rounding metrics use, `uint8((x * 255 + 0.5).clamp(0, 255))`); 1 kB =
1000 bytes. Higher is better, i.e. smaller files: flat, simple images.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

QUALITY = 95


def jpeg_kb(image: torch.Tensor, quality: int = QUALITY) -> float:
    """Size in kB (1000 bytes) of one float image `[3, H, W]` in [0, 1] encoded by Pillow as a JPEG of `quality`."""
    pixels = (image.detach().float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegCompressibility:
    """`(prompts, images [B, 3, H, W] in [0, 1]) -> -jpeg_kb [B]` (float32 on the images' device); prompts unused."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = QUALITY):
        self.quality = quality

    def to(self, device: torch.device | str) -> JpegCompressibility:
        return self  # no weights: the images are encoded on the host

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        sizes = [jpeg_kb(image, self.quality) for image in images]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)
