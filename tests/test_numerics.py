"""Numerics that must match the published runs (docs/algorithm.md §1, §6): the LoRA's gaussian init, float32
timesteps whatever the model dtype, and every LoRA parameter taking part in the backward pass (DDP relies on it)."""

import pytest
import torch

from fdfo.models import tiny_sd3 as tiny
from fdfo.models.sd3 import SD3Policy

RANK = 4


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=RANK, lora_alpha=2 * RANK)


def _lora(policy, which):
    return [p for n, p in policy.transformer.named_parameters() if f"lora_{which}" in n]


def test_lora_a_is_gaussian_with_std_one_over_rank_and_b_is_zero(policy):
    a = torch.cat([p.detach().flatten() for p in _lora(policy, "A")])
    # PEFT "gaussian": A ~ N(0, (1/r)^2) = std 0.25 at r = 4. Its default kaiming-uniform init would give
    # std 1/sqrt(3 * in_features), far below 0.25 for the tiny model's widths.
    assert a.numel() > 1500  # 15 adapted layers x r x 32 inputs
    assert a.std().item() == pytest.approx(1 / RANK, rel=0.05)
    assert abs(a.mean().item()) < 3 / RANK / a.numel() ** 0.5
    # Gaussian, not uniform: the excess kurtosis is ~0 (a uniform law has -1.2)
    kurtosis = ((a - a.mean()) ** 4).mean() / a.var(unbiased=False) ** 2 - 3
    assert abs(kurtosis.item()) < 0.4
    assert all(torch.equal(b, torch.zeros_like(b)) for b in _lora(policy, "B"))


def test_lora_policy_output_equals_the_base_model(policy):
    from diffusers import StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(str(tiny.tiny_sd3_path())).transformer
    cond = policy.encode(["a red apple", "a blue boat"])
    x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    expected = base(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["embeds"],
                    pooled_projections=cond["pooled"], return_dict=False)[0]
    assert torch.equal(policy.velocity(x, sigma, cond), expected)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_transformer_gets_float32_timesteps_from_a_bf16_model(guidance):
    torch.manual_seed(0)
    bf16 = SD3Policy(tiny.TINY_SD3, torch.device("cpu"), lora_rank=RANK, lora_alpha=2 * RANK, guidance_scale=guidance)
    bf16.dtype = torch.bfloat16  # what a CUDA device gets
    bf16.transformer.to(torch.bfloat16)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(bf16.pipe, name).to(torch.bfloat16)
    seen = []
    hook = bf16.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    cond = bf16.encode(["a red apple", "a blue boat"])
    sigma = torch.tensor([0.9871234, 0.3333333])  # bf16 would round 987.1234 to 988 and 333.3333 to 333
    bf16.velocity(torch.randn(2, *bf16.latent_shape(64)), sigma, cond)
    hook.remove()
    (timestep,) = seen
    assert timestep.dtype == torch.float32
    expected = sigma * 1000 if guidance == 1.0 else torch.cat([sigma, sigma]) * 1000
    assert torch.equal(timestep, expected)


def test_every_lora_parameter_gets_a_gradient_the_last_add_q_proj_an_exact_zero(policy):
    """Why DDP runs without find_unused_parameters: no LoRA parameter is left out of the graph. The last joint block
    drops its context output, so its add_q_proj LoRA gets a gradient of exactly zero (it can never change v)."""
    policy.transformer.zero_grad(set_to_none=True)
    saved = {}
    with torch.no_grad():
        for i, b in enumerate(_lora(policy, "B")):  # nonzero B so that the A's get gradients too
            saved[i] = b.clone()
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    try:
        cond = policy.encode(["a red apple", "a blue boat"])
        x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(2))
        policy.velocity(x, torch.tensor([0.9, 0.3]), cond).square().mean().backward()
        grads = {n: p.grad for n, p in policy.transformer.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        last = len(policy.pipe.transformer.transformer_blocks) - 1
        dead = [n for n in grads if f"transformer_blocks.{last}.attn.add_q_proj.lora_" in n]
        assert len(dead) == 2 and all(torch.equal(grads[n], torch.zeros_like(grads[n])) for n in dead)
        assert all(grads[n].abs().max() > 0 for n in grads if n not in dead)
    finally:
        with torch.no_grad():
            for i, b in enumerate(_lora(policy, "B")):
                b.copy_(saved[i])
        policy.transformer.zero_grad(set_to_none=True)
