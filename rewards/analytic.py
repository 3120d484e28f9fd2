"""Analytic rewards: no model and no download, for CPU smoke runs and tests of the training loop."""

from __future__ import annotations

from typing import Sequence

import torch

from rewards.common import check_batch


class Brightness:
    """`scale * mean(image)` over all pixels and channels; prompts are ignored. Returns float32 `[B]`."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def to(self, device: torch.device | str) -> "Brightness":
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        check_batch(prompts, images)
        return images.float().mean(dim=(1, 2, 3)) * self.scale

    def prepare(self, prompts: Sequence[str], images: torch.Tensor) -> tuple[Sequence[str], torch.Tensor]:
        """Nothing to do on the host: the arguments, untouched (they stay on their device), for `score`."""
        return prompts, images

    def score(self, inputs: tuple[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """The scores of `prepare`'s arguments, computed where the images are."""
        return self(*inputs)


class Redness(Brightness):
    """`scale * mean(red - (green + blue) / 2)` over all pixels, in [-1, 1]; prompts are ignored. Float32 `[B]`.

    The smoke preset's reward: unlike brightness, which the decoder's final normalisation makes nearly insensitive
    to the latent, a colour balance has a latent gradient that agrees across images, so a short run can learn it.
    """

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        check_batch(prompts, images)
        images = images.float()
        return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean(dim=(1, 2)) * self.scale
