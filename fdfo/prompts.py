"""Prompt files and the global prompt order of training.

Pair g (counted over the whole run: epoch * pairs_per_epoch + i) gets prompt `perm_p[g mod N]` where `perm_p` is a
permutation of the N prompts seeded by (seed, p) and p = g // N is the pass over the file. The loader position is
therefore a pure function of the counters: resuming, or changing the number of GPUs, continues the same sequence.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdfo.rng import derive_seed

HOW_TO_GET = {
    "pickscore_train.txt": (
        "It is the Pick-a-Pic training prompt list used by Flow-GRPO and FDFO (25,432 lines, one prompt per line; "
        "Flow-GRPO ships it as dataset/pickscore/train.txt). Save it as prompt_sets/pickscore_train.txt or pass "
        "--prompt-file PATH."
    ),
}
PROMPT_STREAM = 0x5052  # separates the prompt-order seeds from the noise seeds


def load_prompts(path: str | Path) -> list[str]:
    """Read one prompt per line, skipping blank lines. Missing or empty file -> FileNotFoundError/ValueError."""
    path = Path(path)
    hint = HOW_TO_GET.get(path.name, "Pass --prompt-file with a text file holding one prompt per line.")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found. {hint}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts. {hint}")
    return prompts


def prompt_indices(num_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of the prompts of global pairs start .. start + count - 1."""
    out, perms = [], {}
    for g in range(start, start + count):
        p = g // num_prompts
        if p not in perms:
            gen = torch.Generator().manual_seed(derive_seed(seed, PROMPT_STREAM, p))
            perms[p] = torch.randperm(num_prompts, generator=gen).tolist()
        out.append(perms[p][g % num_prompts])
    return out
