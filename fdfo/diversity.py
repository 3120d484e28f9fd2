"""The dreamsim_diversity metric (docs/algorithm.md §8): how different the repeats of one prompt look to DreamSim.

"Mean squared distance between DreamSim embeddings of the repeats of a prompt": with e_pr = DreamSim's embedding of
repeat r of prompt p, exactly as `model.embed` returns it,

    diversity_p = mean over the R(R-1)/2 pairs r < r' of ||e_pr - e_pr'||^2

and the reported metric is the mean of diversity_p over prompts.

What DreamSim's embedding is (checked in the source of dreamsim 0.2.1, the sdist on PyPI, dreamsim/model.py): the
factory `dreamsim(pretrained=True, device, cache_dir, normalize_embeds=True, ...)` builds a `PerceptualModel` with
`normalize_embeds=True` by default; `PerceptualModel.embed(img)` concatenates the ensemble's features and, with
`normalize_embeds`, applies `normalize_embedding`, which subtracts each embedding's mean over its features and then
divides it by its L2 norm. So the embeddings are already unit length (and centred): we use them as returned, without
normalising again, and `||a - b||^2 = 2 (1 - cos(a, b))` is twice DreamSim's own distance
(`PerceptualModel.forward` = `1 - cosine_similarity` of the same embeddings); values lie in [0, 4]. Its
`preprocess(pil_image)` resizes to 224 x 224 (bicubic) and converts to a [0, 1] tensor. Older releases (0.1.x)
divided by the norm before subtracting the mean, which leaves the embedding shorter than 1: the install hint pins
0.2.1.

The `dreamsim` package is imported only when the metric is asked for: it pulls torchvision, which the rest of this
project does not need (and which breaks CPU-only installs of transformers/peft; see README).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

INSTALL_HINT = (
    "dreamsim_diversity needs the dreamsim package: `pip install -r requirements-eval.txt \"torch==<your torch "
    "version>\"` (dreamsim 0.2.1; it installs torchvision, so pin your torch to keep pip from replacing it; GPU "
    "machines only, see README). Leave dreamsim_diversity out of --metrics to run without it."
)


def mean_pairwise_sq_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """docs/algorithm.md §8 diversity of each prompt: the mean over pairs r < r' of `||e_r - e_r'||^2`.

    embeddings: `[P, R, D]`, the R >= 2 repeats of P prompts (used as given).
    Returns float64 `[P]`.
    """
    num_repeats = embeddings.shape[1]
    if num_repeats < 2:
        raise ValueError(f"diversity compares the repeats of a prompt: it needs >= 2 of them, got {num_repeats}.")
    e = embeddings.double()
    sq = (e[:, :, None, :] - e[:, None, :, :]).pow(2).sum(-1)  # [P, R, R], zero diagonal, symmetric
    return sq.sum(dim=(1, 2)) / (num_repeats * (num_repeats - 1))  # each unordered pair counted twice


def dreamsim_available() -> bool:
    return importlib.util.find_spec("dreamsim") is not None


class DreamSimEmbedder:
    """DreamSim embeddings of PIL images as `model.embed` returns them (unit length in dreamsim 0.2.1, see above):
    `[B, D]` float32 on CPU."""

    def __init__(self, model, preprocess, device: torch.device):
        self.model, self.preprocess, self.device = model, preprocess, device

    @classmethod
    def load(cls, cache_dir: str, device: torch.device | str) -> DreamSimEmbedder:
        """The pretrained DreamSim ensemble; its weights are downloaded into `cache_dir` on first use."""
        try:
            from dreamsim import dreamsim
        except ImportError as err:
            raise ValueError(f"{INSTALL_HINT} ({err})") from None
        device = torch.device(device)
        model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=cache_dir)
        return cls(model, preprocess, device)

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 0)
        pixels = torch.cat([self.preprocess(image) for image in images]).to(self.device)  # [B, 3, 224, 224]
        return self.model.embed(pixels).float().reshape(len(images), -1).cpu()
