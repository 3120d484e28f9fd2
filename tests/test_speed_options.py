"""Opt-in speed / memory options change nothing in the math: gradient checkpointing gives the default path's velocity
and LoRA gradients on the tiny model (compilation: tests/test_compile.py)."""

import torch

from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD3Policy


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


def test_lowmem24_preset_is_the_paper_run_with_memory_options_only():
    from dataclasses import asdict

    from fdfo.config import PRESETS, Config

    paper, low = asdict(Config()), asdict(PRESETS["lowmem24"]())
    changed = {k for k in paper if paper[k] != low[k]}
    assert changed == {"preset", "max_batch_size", "reward_preset", "train", "reward"}
    assert (paper["sample"]["decode_batch_size"], low["sample"]["decode_batch_size"]) == (1, 1)  # as the authors
    assert (low["max_batch_size"], low["reward_preset"]) == (2, "pickscore")
    assert {k for k in paper["train"] if paper["train"][k] != low["train"][k]} == {"gradient_checkpointing",
                                                                                 "rollout_device"}
    assert {k for k in paper["reward"] if paper["reward"][k] != low["reward"][k]} == {"offload"}
    assert low["offload_text_encoders"] and not paper["train"]["gradient_checkpointing"]


def test_sample_phase_decodes_as_many_images_per_call_as_the_decode_batch_size(tmp_path, monkeypatch):
    """--sample.decode-batch-size reaches the VAE: 2 pairs per sampling batch are 4 images, decoded one per call by
    default (as the authors' training, and lowmem24), 3 + 1 with 3 and all 4 at once with None, to the same images up
    to the kernels' rounding. The baselines' sampling decodes one image per call by default too."""
    from fdfo.algorithms.groups import sample_groups
    from fdfo.config import PRESETS, batch_geometry
    from fdfo.phases import sample_phase
    from rewards import Term, WeightedReward
    from rewards.analytic import Redness
    from tests.test_train import tiny_config

    policy = _policy()
    policy.transformer.eval()
    calls = []
    decode = policy.pipe.vae.decode
    monkeypatch.setattr(policy.pipe.vae, "decode", lambda z, **kw: calls.append(len(z)) or decode(z, **kw))
    reward = WeightedReward([Term("redness", 1.0, Redness())], "cpu")
    prompts = ["a red apple", "a blue boat"]
    finals = []
    for size, expected in (("default", [1, 1, 1, 1]), (3, [3, 1]), (None, [4])):
        cfg = tiny_config(tmp_path, total_pairs_per_epoch=2)
        if size != "default":
            cfg.sample.decode_batch_size = size
        calls.clear()
        samples = sample_phase(policy, reward, cfg, batch_geometry(cfg, 1), 0, prompts, 0)
        assert calls == expected
        finals.append(samples)
    for other in finals[1:]:
        assert torch.equal(finals[0].final, other.final)  # the same trajectories: only the decode was split
        torch.testing.assert_close(finals[0].rewards["reward"], other.rewards["reward"], rtol=0, atol=1e-4)
    for preset in ("smoke_flow_grpo", "smoke_diffusion_nft"):
        cfg = PRESETS[preset]()
        cfg.sample.num_solver_steps, cfg.baseline.group_size, cfg.total_pairs_per_epoch = 2, 2, 2
        calls.clear()
        sample_groups(policy, reward, cfg, batch_geometry(cfg, 1), 0, prompts, 0)
        assert calls == [1, 1, 1, 1], preset
