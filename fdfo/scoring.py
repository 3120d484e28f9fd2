"""Scoring the sampled batches of an epoch, optionally with the reward's CPU preprocessing overlapped with sampling.

Without overlap each batch is scored as soon as it is decoded, while the GPU waits for the host-side work of the
reward models (image processors, tokenisers). With `--reward.overlap-preprocessing` the main thread only stages the
decoded images on the device and starts their copy to pinned host memory; ONE worker thread waits for that copy and
runs the CPU preparation while the main thread samples the next batch; the main thread then runs the model forwards
(`flush`). The worker does no device work, no collective and draws no random numbers, so every rank issues the same
collectives in the same order and the scores are the same numbers as without overlap.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import torch


class BatchScorer:
    """`submit(prompts, images, batch)` puts the reward components, float32 on `device`, into `batch["rewards"]`:
    at once, or (overlap) at the next `flush()`, which the caller runs after queueing the next batch's sampling and
    once more after the last batch. Use through `batch_scorer`, which shuts the worker down on every path."""

    def __init__(self, reward, device: torch.device, pool: ThreadPoolExecutor | None):
        self.reward, self.device, self.pool = reward, device, pool
        self._pending: tuple[Future, dict, torch.device] | None = None

    def submit(self, prompts: Sequence[str], images: torch.Tensor, batch: dict) -> None:
        if self.pool is None:
            batch["rewards"] = self._on_device(self.reward.components(prompts, images))
            return
        self.flush()  # at most one batch in flight: the worker and the main thread never share a tokenizer
        host, ready = to_host(self.reward.stage(prompts, images))
        future = self.pool.submit(_prepare, self.reward, list(prompts), host, images, ready)
        self._pending = (future, batch, images.device)

    def flush(self) -> None:
        """Score the batch in flight, if any; an exception of its preparation is raised here."""
        if self._pending is None:
            return
        future, batch, device = self._pending
        self._pending = None
        batch["rewards"] = self._on_device(self.reward.score_components(future.result(), device))

    def _on_device(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.float().to(self.device) for k, v in scores.items()}


@contextlib.contextmanager
def batch_scorer(reward, device: torch.device, overlap: bool) -> Iterator[BatchScorer]:
    """A `BatchScorer`; with `overlap` (and a reward that has the split `stage` / `prepare_components` /
    `score_components` API, e.g. `WeightedReward`) its single worker thread lives exactly as long as this block."""
    if not (overlap and hasattr(reward, "score_components")):
        yield BatchScorer(reward, device, None)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-prepare") as pool:
        yield BatchScorer(reward, device, pool)


def to_host(staged: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Start copying `staged` to the host: CUDA tensors into pinned memory without blocking, then an event recorded
    after the copies (None when there is nothing to wait for); CPU tensors are handed over as they are.

    A plain `.cpu()` in the worker would instead queue behind the next batch's sampling kernels on the same stream.
    """
    host, stream = {}, None
    for name, tensor in staged.items():
        if tensor.device.type == "cuda":
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
            stream = torch.cuda.current_stream(tensor.device)
        else:
            host[name] = tensor.cpu()  # CPU: the tensor itself (another accelerator: a blocking copy)
    if stream is None:
        return host, None
    ready = torch.cuda.Event()
    ready.record(stream)  # after every copy above: they are all on this stream
    return host, ready


def _prepare(reward, prompts: list[str], host: dict[str, torch.Tensor], images: torch.Tensor,
             ready: torch.cuda.Event | None) -> dict[str, object]:
    """The worker's job: wait for the host copies, then the reward's CPU preparation (no device work)."""
    if ready is not None:
        ready.synchronize()
    return reward.prepare_components(prompts, host, images)


def nonfinite_report(rewards: dict[str, torch.Tensor], preset: str, cfg) -> str:
    """Which terms of the reward (`--reward-preset preset`, RewardConfig `cfg`) scored this process's images
    non-finite, and which terms are in use: the end of the message of an epoch in which no sample has a finite
    reward."""
    from rewards.build import training_specs

    total = rewards["reward"].numel()
    bad = {name: int((~torch.isfinite(v)).sum()) for name, v in rewards.items() if name != "reward"}
    named = ", ".join(f"{name} ({count} of {total})" for name, count in bad.items() if count) or \
        "none of the terms: their weighted sum overflowed"
    specs = " ".join(repr(s) for s in training_specs(preset, cfg))
    origin = f"--reward.specs {specs}" if cfg.specs else f"--reward-preset {preset}, that is {specs}"
    return f"non-finite scores of this process's {total} images: {named}; check those terms of the reward ({origin})"
