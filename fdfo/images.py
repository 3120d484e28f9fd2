"""Float images to 8 bits and PIL, by one rule everywhere (docs/algorithm.md §8): metrics, grids, saved images and
the logged rollout pairs all round the same way, in the dtype of the tensor they are given (for generated images the
pipeline's output dtype, so metrics, grids and saved images of a seed see the same pixels)."""

from __future__ import annotations

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> `uint8((x * 255 + 0.5).clamp(0, 255))`, evaluated in the images' own dtype: round half
    up (the cast truncates the non-negative values), exact for images that are already 8-bit. Any shape.

    The dtype matters (docs/algorithm.md §8): the authors round the pipeline's output tensor as it comes, so a bf16
    pipeline's images round in bf16 arithmetic (every level in 128..254 comes out even; about a quarter of the pixels
    differ by one level from float32 rounding). Hand this function the pipeline's own tensor, not a float32 copy.
    """
    images = images.detach()
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 takes float images in [0, 1], got {images.dtype}")
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` uint8 image -> RGB PIL image with the same pixel values."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB")


def to_pil(image: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` float image in [0, 1] -> 8-bit RGB PIL image (the `to_uint8` rule)."""
    return uint8_to_pil(to_uint8(image))
