"""Explicit randomness: every generator is seeded from a tuple of integers (seed, epoch, pair, ...), so results do
not depend on which rank draws them, on batch sizes, or on whether the run was resumed."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def generator(device: torch.device | str, *keys: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def randn_per_sample(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Stack one `shape` draw from each generator: `[len(generators), *shape]`, float32."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
