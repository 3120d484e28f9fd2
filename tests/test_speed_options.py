"""Opt-in speed / memory options change nothing in the math: gradient checkpointing and regional compilation give
the default path's velocity and LoRA gradients on the tiny model."""

import pytest
import torch

from fdfo import tiny
from fdfo.sd3 import SD3Policy


def _policy(**options):
    torch.manual_seed(0)
    policy = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=4, lora_alpha=8)
    with torch.no_grad():  # a non-zero LoRA update, so that gradients reach both A and B
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    policy.speed_options(**options)
    policy.transformer.train()
    return policy


def _velocity_and_grads(policy):
    g = torch.Generator().manual_seed(1)
    cond = policy.encode(["a red apple", "a blue boat"])
    x = torch.randn(2, *policy.latent_shape(64), generator=g)
    v = policy.velocity(x, torch.tensor([0.9, 0.3]), cond)
    v.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    return v.detach(), grads


def _assert_same(a, b, tol):
    (va, ga), (vb, gb) = a, b
    assert torch.allclose(va, vb, atol=tol, rtol=tol)
    assert ga.keys() == gb.keys()
    nonzero = 0
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=tol, rtol=tol), name
        nonzero += bool((ga[name] != 0).any())
    assert nonzero > len(ga) // 2  # the comparison is not between zero gradients


def test_gradient_checkpointing_gives_the_default_velocity_and_gradients():
    default = _velocity_and_grads(_policy())
    checkpointed = _policy(gradient_checkpointing=True)
    assert checkpointed.pipe.transformer.gradient_checkpointing
    _assert_same(default, _velocity_and_grads(checkpointed), 1e-6)


@pytest.mark.slow
def test_compiled_blocks_give_the_default_velocity_and_gradients():
    _assert_same(_velocity_and_grads(_policy()), _velocity_and_grads(_policy(compile_blocks=True)), 1e-4)


def test_lowmem24_preset_is_the_paper_run_with_memory_options_only():
    from dataclasses import asdict

    from fdfo.config import PRESETS, Config

    paper, low = asdict(Config()), asdict(PRESETS["lowmem24"]())
    changed = {k for k in paper if paper[k] != low[k]}
    assert changed == {"preset", "max_batch_size", "reward_preset", "train", "reward"}
    assert (low["max_batch_size"], low["reward_preset"]) == (2, "pickscore")
    assert {k for k in paper["train"] if paper["train"][k] != low["train"][k]} == {"gradient_checkpointing",
                                                                                 "rollout_device"}
    assert {k for k in paper["reward"] if paper["reward"][k] != low["reward"][k]} == {"offload"}
    assert low["offload_text_encoders"] and not paper["train"]["gradient_checkpointing"]
