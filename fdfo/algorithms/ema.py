"""The adapters a baseline keeps beside the trained LoRA tensors theta (docs/algorithm.md §11): the evaluated EMA
(both methods: what a checkpoint saves as its adapter) and DiffusionNFT's sampling adapter `old`. They are fp32 copies
of the LoRA parameters; `swapped` puts one into the parameters for sampling or saving, so one PEFT adapter serves
all three. theta (and old) go to training_state.pt, so a resumed run continues bit for bit."""

from __future__ import annotations

import contextlib

import torch

EMA_CAP = 0.9
EMA_INTERVAL = {"flow_grpo": 8, "diffusion_nft": 1}  # optimizer steps between EMA updates, as the authors


# docs/algorithm.md §11: the EMA's decay after optimizer step s (counted from 1) warms up as (1 + s) / (10 + s).
def ema_decay(step: int, cap: float = EMA_CAP) -> float:
    """min((1 + s) / (10 + s), cap): 2/11 after the first step, the cap from s = 80 on (cap 0.9)."""
    return min((1 + step) / (10 + step), cap)


def ema_updates_at(step: int, interval: int) -> bool:
    """Whether the EMA is updated after optimizer step s (counted from 1): when (s + 1) is a multiple of the interval,
    the authors' phase (interval 8: after steps 7, 15, 23, ...; interval 1: every step)."""
    return (step + 1) % interval == 0


@torch.no_grad()
def blend_(target: list[torch.Tensor], source: list[torch.Tensor], keep: float) -> None:
    """In place: target <- keep * target + (1 - keep) * source, tensor by tensor (old-policy update and EMA)."""
    for t, s in zip(target, source, strict=True):
        t.mul_(keep).add_(s.detach().to(t.dtype), alpha=1 - keep)


class Copies:
    """The EMA (and, with `old`, DiffusionNFT's sampling adapter) beside the trained LoRA parameters `params`.

    step: optimizer steps done (the run's global step); cap, interval: the EMA's decay cap and update interval;
    blends: how many times the blend runs at each update point (the authors' Flow-GRPO loop blends once per training
    batch of the step: docs/algorithm.md §11), so the EMA keeps d**blends of its old value there."""

    def __init__(self, params: list[torch.Tensor], step: int, cap: float, interval: int, prefix: str,
                 old: bool = False, blends: int = 1):
        self.params, self.step, self.cap, self.interval, self.prefix = params, step, cap, interval, prefix
        self.blends = blends
        self.ema = [p.detach().clone() for p in params]
        self.old = [p.detach().clone() for p in params] if old else None

    @property
    def state_keys(self) -> tuple[str, ...]:
        return (f"{self.prefix}_theta",) + ((f"{self.prefix}_old",) if self.old is not None else ())

    def after_step(self) -> None:
        self.step += 1
        if ema_updates_at(self.step, self.interval):
            for _ in range(self.blends):
                blend_(self.ema, self.params, keep=ema_decay(self.step, self.cap))

    @contextlib.contextmanager
    def swapped(self, values: list[torch.Tensor]):
        """The LoRA parameters hold `values` inside the block (sampling with old, saving the EMA), then theta again."""
        theta = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, theta, strict=True):
                    p.copy_(v)

    def state(self) -> dict:
        """What a checkpoint needs beside the saved (EMA) adapter: theta (and old)."""
        state = {f"{self.prefix}_theta": [p.detach().cpu().clone() for p in self.params]}
        if self.old is not None:
            state[f"{self.prefix}_old"] = [t.cpu().clone() for t in self.old]
        return state

    def restore(self, state: dict) -> None:
        """After the saved adapter (the EMA) was loaded into the parameters: take it as the EMA, put theta back."""
        self.ema = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, state[f"{self.prefix}_theta"], strict=True):
                p.copy_(v)
        if self.old is not None:
            self.old = [v.to(p.device, p.dtype) for p, v in zip(self.params, state[f"{self.prefix}_old"], strict=True)]


def baseline_copies(cfg, params: list[torch.Tensor], step: int) -> Copies:
    """The run's Copies for baseline `cfg.algorithm` (a Config) after `step` optimizer steps: the EMA's cap, interval
    (default EMA_INTERVAL) and blends per update point from `cfg.baseline`; DiffusionNFT's `old` beside it."""
    b, nft = cfg.baseline, cfg.algorithm == "diffusion_nft"
    return Copies(params, step, b.ema_decay, b.ema_interval or EMA_INTERVAL[cfg.algorithm], "nft" if nft else "grpo",
                  old=nft, blends=b.ema_blends)
