"""Float images to 8 bits and PIL, by one rule everywhere (docs/algorithm.md §8): metrics, grids, saved images and
the logged rollout pairs all see the same pixels."""

from __future__ import annotations

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> `uint8((x * 255 + 0.5).clamp(0, 255))`: round half up (the cast truncates the
    non-negative values), exact for images that are already 8-bit. Any shape, e.g. `[B, 3, H, W]`."""
    return (images.detach().float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` uint8 image -> RGB PIL image with the same pixel values."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")


def to_pil(image: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` float image in [0, 1] -> 8-bit RGB PIL image (the `to_uint8` rule)."""
    return uint8_to_pil(to_uint8(image))
