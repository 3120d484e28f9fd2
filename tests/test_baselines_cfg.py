"""Flow-GRPO's loss at CFG 4.5 on the tiny SD3 pipeline (docs/algorithm.md §11): the unconditional prediction is
detached, so only g times the conditional prediction's Jacobian reaches the LoRA."""

import torch

from fdfo import train_loop
from fdfo.algorithms import flow_grpo
from tests.test_algorithms_sd3 import tiny_config


def test_flow_grpo_cfg_gradient_reaches_the_lora_only_through_the_conditional_prediction(monkeypatch, tmp_path):
    """CFG 4.5 in the loss with the unconditional prediction detached: the LoRA gradient of item_loss equals a
    cond-only backward of g * dL/dv (dL/dv taken from the loss's own velocity), not g J_c - (g - 1) J_u."""
    cfg = tiny_config("flow_grpo", tmp_path / "run")
    cfg.sample.guidance_scale = 4.5
    policy = train_loop.build_policy(cfg, torch.device("cpu"))
    params = policy.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B = 0 at initialisation would hide the uncond path
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    cond = policy.encode(["a red apple", "a blue car"])
    sigmas = policy.sigmas(3).float()
    x = torch.randn(2, *policy.latent_shape(cfg.sample.resolution), generator=gen)
    j = torch.tensor([0, 1])
    with torch.no_grad():
        v = flow_grpo.guided_velocity(policy, x, sigmas[j], cond)
        nxt, mean, step_std = flow_grpo.sde_step(x, v, sigmas[j], sigmas[j + 1], torch.randn(x.shape, generator=gen),
                                                 0.7, sigmas[1])
        logp_old = flow_grpo.step_log_prob(nxt, mean, step_std)  # ratio 1: the policy term has a gradient
    seen = {}
    real = flow_grpo.guided_velocity

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        out.register_hook(lambda grad: seen.setdefault("dv", grad))
        return out

    monkeypatch.setattr(flow_grpo, "guided_velocity", spy)
    batch = {"state": x, "next": nxt, "logp_old": logp_old, "timestep": j, "weight": torch.tensor([1.0, -0.5]),
             "cond": cond}
    loss, _ = flow_grpo.item_loss(policy, policy.transformer, batch, sigmas, cfg)
    grads = torch.autograd.grad(loss.sum(), params)
    policy.guidance_scale = 1.0
    v_cond = policy.velocity(x, sigmas[j], cond)
    expected = torch.autograd.grad((v_cond * (4.5 * seen["dv"])).sum(), params)
    num = sum(float((g - e).square().sum()) for g, e in zip(grads, expected, strict=True)) ** 0.5
    den = sum(float(e.square().sum()) for e in expected) ** 0.5
    assert den > 0 and num <= 1e-4 * den, (num, den)


def test_flow_grpo_loss_velocity_is_the_samplers_under_autocast():
    """theta == old must give ratio 1: under autocast the loss's CFG velocity is the sampler's bit for bit (the same
    batched call, the combination in the autocast output dtype as the authors form it, not in float32)."""
    from tests.test_numerics_authors import gpu_like_policy

    policy = gpu_like_policy(torch.bfloat16, guidance=4.5)
    cond = policy.encode(["a red apple", "a blue car"])
    x = torch.randn(2, *policy.latent_shape(64), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        sampler = policy.velocity(x, sigma, cond)
        loss_side = flow_grpo.guided_velocity(policy, x, sigma, cond)
        neg = policy.negative()
        both = {"embeds": torch.cat([neg["embeds"].expand(2, -1, -1), cond["embeds"]]),
                "pooled": torch.cat([neg["pooled"].expand(2, -1), cond["pooled"]])}
        policy.guidance_scale = 1.0
        v_u, v_c = policy.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
    assert torch.equal(loss_side, sampler)
    assert not torch.equal(v_u + 4.5 * (v_c - v_u), sampler)  # a float32 combination would not be the sampler's
