"""What every scorer shares: the input contract, chunking, and loading models with one clear "not found" error.

A reward is any callable `(prompts: list[str], images: Tensor[B, 3, H, W] in [0, 1]) -> Tensor[B]` (float32, on the
images' device); scorers run without gradients, in chunks of `chunk_size` images, and are deterministic.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def check_batch(prompts: Sequence[str], images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is `[B, 3, H, W]` floating point and there is one prompt string per image."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"Rewards take float images [B, 3, H, W] in [0, 1]; got {images.dtype} {tuple(images.shape)}.")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"Rewards take one prompt per image: got {count} for {images.shape[0]} images.")


def chunk_slices(batch: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk_size` covering `range(batch)`."""
    if chunk_size < 1:
        raise ValueError(f"--reward.chunk-size must be >= 1, got {chunk_size}.")
    for start in range(0, batch, chunk_size):
        yield slice(start, min(start + chunk_size, batch))


def load_pretrained(load: Callable[[str], T], model_id: str, option: str, what: str) -> T:
    """Return `load(model_id)`, turning "not found" errors into one `FileNotFoundError` that says how to fix it.

    `load` is e.g. `CLIPModel.from_pretrained`; `option` is the `RewardConfig` field holding `model_id` (named in the
    message as its command-line flag) and `what` a short description ("PickScore model"). Hub ids resolve through
    the Hugging Face cache, which honours `HF_HUB_OFFLINE` and `HF_HUB_CACHE`/`HF_HOME`.
    """
    try:
        return load(model_id)
    except OSError as err:  # transformers reports a missing repo, file or cache entry as OSError
        flag = "--reward." + option.replace("_", "-")
        if os.path.isdir(model_id):
            message = f"The folder {model_id!r} given as the {what} ({flag}) does not hold a loadable model: {err}"
            raise FileNotFoundError(message) from err
        if _looks_like_path(model_id):
            message = f"The {what} folder {model_id!r} ({flag}) does not exist; give an existing folder or a hub id."
            raise FileNotFoundError(message) from err
        offline = " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if _offline() else ""
        raise FileNotFoundError(
            f"Cannot load the {what} {model_id!r}: it is not a local folder, and it is neither in the Hugging Face "
            f"cache nor could it be downloaded{offline}. Fetch it with `hf download {model_id}` "
            f"(or `huggingface-cli download {model_id}`), or point {flag} at a local folder that holds it.\n"
            f"(Original error: {err})"
        ) from err


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else the user meant as a folder."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
