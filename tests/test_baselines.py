"""Flow-GRPO and DiffusionNFT pieces (docs/algorithm.md §11) against hand values and independent re-derivations."""

import math

import pytest
import torch

from fdfo.algorithms import diffusion_nft as nft
from fdfo.algorithms import flow_grpo as grpo
from fdfo.algorithms.ema import blend_


def test_sde_noise_level_hand_values():
    # a sqrt(sigma / (1 - sigma)); at sigma = 1 the second grid level 0.9 takes the denominator: 0.7 sqrt(1 / 0.1).
    assert grpo.sde_noise_level(0.5, 0.5, 0.9).item() == pytest.approx(0.5)
    assert grpo.sde_noise_level(0.2, 0.7, 0.9).item() == pytest.approx(0.7 * math.sqrt(0.25))
    assert grpo.sde_noise_level(1.0, 0.7, 0.9).item() == pytest.approx(0.7 * math.sqrt(10.0))


def test_sde_step_hand_value():
    # x = 1, v = 2, sigma 0.5 -> 0.25, a = 0.5: std = 0.5, dt = -0.25,
    # mean = 1 (1 + 0.25 (-0.25) / 1) + 2 (1 + 0.25 0.5 / 1) (-0.25) = 0.9375 - 0.5625 = 0.375; step std 0.5 * 0.5.
    x, v, n = torch.ones(1, 1), torch.full((1, 1), 2.0), torch.full((1, 1), 0.4)
    x_next, mean, step_std = grpo.sde_step(x, v, 0.5, 0.25, n, a=0.5, sigma_second=0.9)
    assert mean.item() == pytest.approx(0.375)
    assert step_std.item() == pytest.approx(0.25)
    assert x_next.item() == pytest.approx(0.375 + 0.25 * 0.4)


def test_sde_step_without_noise_level_is_euler():
    g = torch.Generator().manual_seed(0)
    x, v, n = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.0])
    x_next, mean, _ = grpo.sde_step(x, v, sigma, sigma_next, n, a=0.0, sigma_second=0.8)
    euler = x + (sigma_next - sigma).reshape(-1, 1, 1) * v
    torch.testing.assert_close(mean, euler)
    torch.testing.assert_close(x_next, euler)


def test_step_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, v, n = (torch.randn(4, 3, 8, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.75, 0.5, 0.25]), torch.tensor([0.75, 0.5, 0.25, 0.1])
    x_next, mean, step_std = grpo.sde_step(x, v, sigma, sigma_next, n, a=0.7, sigma_second=0.75)
    # Independent: the transition density written from the spec's formulas and torch.distributions.
    expected = []
    for i in range(4):
        s, s_next = sigma[i].item(), sigma_next[i].item()
        std = 0.7 * math.sqrt(s / (1 - (0.75 if s == 1 else s)))
        dt = s_next - s
        mu = x[i] * (1 + std**2 * dt / (2 * s)) + v[i] * (1 + std**2 * (1 - s) / (2 * s)) * dt
        normal = torch.distributions.Normal(mu, std * math.sqrt(-dt))
        torch.testing.assert_close(x_next[i], mu + std * math.sqrt(-dt) * n[i])
        expected.append(normal.log_prob(x_next[i]).mean())
    torch.testing.assert_close(grpo.step_log_prob(x_next, mean, step_std), torch.stack(expected))


def test_group_advantages_hand_example():
    # groups {1, 3} and {2, 6}: centred -1, 1, -2, 2; population std of all four rewards = sqrt(14 / 4).
    adv = grpo.group_advantages(torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (math.sqrt(3.5) + 1e-4))
    # One outlier among 50 zeros: (100 - 100/51) / (100 sqrt(50) / 51) = 7.07 > 5 is clipped; the rest sit at -0.14.
    rewards = torch.zeros(51)
    rewards[0] = 100.0
    adv = grpo.group_advantages(rewards, torch.zeros(51, dtype=torch.long))
    assert adv[0].item() == 5.0
    assert adv[1].item() == pytest.approx(-(100 / 51) / (100 * math.sqrt(50) / 51 + 1e-4))


def test_clipped_loss_hand_values_and_zero_gradient_outside_clip():
    # A = 1, rho = 1.5, eps = 0.2: max(-1.5, -1.2) = -1.2. A = -1, rho = 0.5: max(0.5, 0.8) = 0.8.
    logp_old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    loss, stats = grpo.clipped_loss(logp, logp_old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros(2))
    # Inside the clip region the gradient is -A rho / N.
    logp = torch.log(torch.tensor([1.1, 0.95])).requires_grad_()
    loss, stats = grpo.clipped_loss(logp, logp_old, torch.tensor([2.0, -1.0]), clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0 * 1.1, 1.0 * 0.95]) / 2)
    assert stats["clipfrac"].item() == 0.0


def test_kl_term_value_and_sign():
    mean_ref = torch.zeros(1, 2)
    zeros = torch.zeros(1)
    kls = []
    for d in (0.0, 0.3, 0.6):
        mean = torch.full((1, 2), d, requires_grad=True)
        loss, stats = grpo.clipped_loss(zeros, zeros, zeros, 0.1, mean, mean_ref, torch.tensor(0.5), beta=0.04)
        kls.append(stats["kl"].item())
        loss.backward()
        if d > 0:
            assert (mean.grad > 0).all()  # descending the loss moves mu_theta back towards mu_ref
    assert kls == pytest.approx([0.0, 0.09 / 0.5, 0.36 / 0.5])  # d^2 / (2 s^2)
    with pytest.raises(ValueError, match="beta > 0"):
        grpo.clipped_loss(zeros, zeros, zeros, 0.1, beta=0.04)


def test_optimality_hand_values():
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (math.sqrt(3.5) + 1e-4)
    torch.testing.assert_close(nft.optimality(rewards, groups), adv / 10 + 0.5)
    big = torch.zeros(51)
    big[0] = 100.0
    assert nft.optimality(big, torch.zeros(51, dtype=torch.long))[0].item() == pytest.approx(1.0)  # A = 5 -> r = 1


def test_implicit_policies_at_old_policy_and_gradient_path():
    v_old = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    v_theta = v_old.clone().requires_grad_()
    pos, neg = nft.implicit_policies(v_theta, v_old, beta=0.3)
    torch.testing.assert_close(pos, v_old)
    torch.testing.assert_close(neg, v_old)
    v_old.requires_grad_()
    pos, neg = nft.implicit_policies(v_theta, v_old, beta=0.3)
    (pos + neg).sum().backward()
    assert v_old.grad is None  # stop-gradient on the old policy
    torch.testing.assert_close(v_theta.grad, torch.zeros(2, 3))  # +beta and -beta cancel


def test_nft_loss_hand_value_r_one():
    # One element: x_t = 1, t = 0.5, x0 = 0. With beta = 1, v+ = v_theta = 1: x0+ = 0.5, w+ = 0.5, L+ = 0.25/0.5.
    # r = 1 keeps only L+: loss = 5 * 0.5 / 1 + 1e-4 (v_theta - v_ref)^2 with v_ref = 0.
    one = torch.ones(1, 1)
    loss, stats = nft.nft_loss(one, 3 * one, 0 * one, one, 0 * one, 0.5, torch.ones(1), beta=1.0)
    assert loss.item() == pytest.approx(2.5 + 1e-4)
    assert stats["loss_pos"].item() == pytest.approx(0.5)
    # v- = 2 * 3 - 1 = 5 -> x0- = -1.5, w- = 1.5, L- = 2.25 / 1.5 = 1.5 (logged, but weighted by 1 - r = 0).
    assert stats["loss_neg"].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="beta"):
        nft.nft_loss(one, one, one, one, one, 0.5, torch.ones(1), beta=0.0)


def test_nft_gradient_at_old_policy_is_reward_weighted_regression():
    # At v_theta = v_old both sides share x0_hat and w, and d/dv_theta of the policy term is
    # 5 (2 r - 1) * (-t) * 2 (x0_hat - x0) / (n w) per item, divided by N for the batch mean.
    g = torch.Generator().manual_seed(3)
    v_old, x_t, x0 = (torch.randn(3, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9])
    r = torch.tensor([0.0, 0.3, 1.0])
    v_theta = v_old.clone().requires_grad_()
    loss, _ = nft.nft_loss(v_theta, v_old, v_old, x_t, x0, t, r, beta=0.4)
    loss.backward()
    error = x_t - t[:, None] * v_old - x0
    w = error.abs().mean(dim=1, keepdim=True)
    expected = 5 * (2 * r[:, None] - 1) * (-t[:, None]) * 2 * error / (4 * w) / 3
    torch.testing.assert_close(v_theta.grad, expected)


def test_old_policy_decay_and_blend():
    assert [nft.old_policy_decay(s) for s in (0, 100, 499, 500, 5000)] == pytest.approx([0.0, 0.1, 0.499, 0.5, 0.5])
    target, source = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    blend_(target, source, keep=0.25)
    torch.testing.assert_close(target[0], torch.tensor([0.25 + 2.25, 0.5 + 4.5]))


class _LinearPolicy:
    """A stand-in for SD3Policy in item_loss: v_theta = x + 1 everywhere, v_ref = x (the adapter off)."""

    guidance_scale = 1.0

    def velocity(self, x, sigma, cond, module=None):
        return x + 1

    def base_velocity(self, x, sigma, cond):
        return x.clone()


def test_flow_grpo_kl_term_of_one_step_by_hand():
    # sigma 0.5 -> 0.25, a = 0.7: std = 0.7, dt = -0.25; mu - mu_ref = (v - v_ref)(1 + 0.49 * 0.5 / 0.5)(-0.25)
    # = -0.31125; KL = 0.31125^2 / (2 * 0.49) = 0.098853..., no (-dt) in the denominator (that would be 4x larger)
    from types import SimpleNamespace

    cfg = SimpleNamespace(baseline=SimpleNamespace(noise_level=0.7), train=SimpleNamespace(clip_range=1e-4,
                                                                                           kl_weight=0.01))
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])
    x = torch.zeros(1, 2, 2)
    _, mean, step_std = grpo.sde_step(x, x + 1, 0.5, 0.25, torch.zeros_like(x), 0.7, 0.5)
    batch = {"state": x, "next": mean, "logp_old": grpo.step_log_prob(mean, mean, step_std),
             "timestep": torch.tensor([1]), "weight": torch.zeros(1), "cond": {}}
    loss, stats = grpo.item_loss(_LinearPolicy(), None, batch, sigmas, cfg)
    assert stats["kl"].item() == pytest.approx(0.31125**2 / 0.98, rel=1e-6)
    assert loss.item() == pytest.approx(0.01 * 0.31125**2 / 0.98, rel=1e-6)


def test_ema_decay_warms_up_and_caps():
    from fdfo.algorithms.ema import ema_decay, ema_updates_at

    assert [ema_decay(s) for s in (1, 2, 80, 1000)] == pytest.approx([2 / 11, 3 / 12, 0.9, 0.9])
    assert [s for s in range(1, 25) if ema_updates_at(s, 8)] == [7, 15, 23]
    assert all(ema_updates_at(s, 1) for s in range(1, 5))
    assert nft.old_policy_decay(1) == pytest.approx(0.001)  # counted from 1: 0.001 after the first step


def test_zero_advantage_samples_leave_the_loss_mean_and_groups_are_prompt_texts():
    from types import SimpleNamespace

    from fdfo.algorithms.groups import group_weights, item_scales
    from fdfo.config import PRESETS

    cfg = PRESETS["smoke_flow_grpo"]()
    cfg.baseline.group_size = 2
    # prompts a, b, a: "a" drawn twice is ONE group of four; b's two equal rewards give A = 0 for both
    samples = SimpleNamespace(rewards={"reward": torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 6.0])}, prompts=["a", "b", "a"])
    weights, invalid = group_weights(samples, cfg)
    std = float(torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 6.0]).std(correction=0))
    torch.testing.assert_close(weights, torch.tensor([-2.0, 0.0, 0.0, 0.0, -1.0, 3.0]) / (std + 1e-4))
    kept = grpo.kept_samples(weights)
    assert kept.tolist() == [True, False, False, False, True, True] and invalid == 0
    # 6 samples x 2 timesteps (item // 2 = sample), 2 steps of 6 items: step 0's samples 0 1 2 4 4 5 hold 4 kept
    # items -> 1/4 each; step 1's samples 0 1 2 3 3 5 hold 2 -> 1/2 each; dropped samples' items weigh 0
    items = torch.tensor([0, 2, 4, 8, 9, 10, 1, 3, 5, 6, 7, 11])
    scale = item_scales(kept, [items], num_timesteps=2, steps=2, world_size=1)
    torch.testing.assert_close(scale, torch.tensor([0.25, 0, 0, 0.25, 0.25, 0.25, 0.5, 0, 0, 0, 0, 0.5]))


def test_baseline_step_gradient_is_the_mean_over_kept_items(monkeypatch):
    """baseline_micro_batch weights each item's loss by data.scale: with item losses w_i * p, the accumulated gradient
    of a step is the mean of w_i over its kept items (dropped samples' items weigh 0)."""
    from types import SimpleNamespace

    from fdfo.algorithms import groups

    p = torch.zeros((), requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    def item_loss(policy, module, batch, sigmas, cfg):
        loss = batch["w"] * p
        return loss, {"policy_loss": loss.detach(), "kl": loss.detach(), "clipfrac": torch.zeros_like(loss)}

    monkeypatch.setattr(grpo, "item_loss", item_loss)
    kept = torch.tensor([True, False, True])  # sample 1 dropped
    items = torch.tensor([0, 1, 2, 3, 4, 5])  # item // 2 = sample
    scale = groups.item_scales(kept, [items], num_timesteps=2, steps=2, world_size=1)
    data = SimpleNamespace(sample=items // 2, rows={"timestep": torch.zeros(6, dtype=torch.long), "w": w},
                           per_sample={}, cond={}, prompt=torch.zeros(6, dtype=torch.long), sigmas=None, scale=scale)
    policy = SimpleNamespace(device=torch.device("cpu"))
    scaler = SimpleNamespace(scale=lambda loss: loss)
    cfg = SimpleNamespace(algorithm="flow_grpo")
    for ids in (torch.tensor([0, 1]), torch.tensor([2])):  # step 0 in two micro-batches
        groups.baseline_micro_batch(policy, None, scaler, data, ids, cfg, 3)
    # step 0's items 0, 1, 2 belong to samples 0, 0, 1: kept w = 1, 2 -> mean 1.5
    assert p.grad.item() == pytest.approx(1.5)


@pytest.mark.parametrize("preset, updates", [("flow_grpo", {7: 2, 15: 2}),
                                             ("diffusion_nft", dict.fromkeys(range(1, 17), 1))])
def test_the_presets_ema_interval_and_blends_per_update_point(preset, updates):
    """The EMA a run builds from the preset (fdfo.algorithms.ema.baseline_copies, as train_loop.setup): Flow-GRPO
    updates after steps 7 and 15 of 16 (interval 8, the authors' phase) and blends twice there as the authors' 32-GPU
    loop does (keeping d^2 with d = (1 + s) / (10 + s)); DiffusionNFT once after every step. theta_s = s by hand."""
    from fdfo.algorithms.ema import baseline_copies
    from fdfo.config import PRESETS

    param = torch.zeros((), dtype=torch.float64)
    copies = baseline_copies(PRESETS[preset](), [param], step=0)
    expected = 0.0
    for s in range(1, 17):
        param.fill_(float(s))
        copies.after_step()
        if s in updates:
            keep = ((1 + s) / (10 + s)) ** updates[s]
            expected = keep * expected + (1 - keep) * s
        assert copies.ema[0].item() == pytest.approx(expected, rel=1e-12), s


def test_flow_grpo_steps_train_whole_trajectories_whatever_the_gpu_count():
    """§11: each of Flow-GRPO's optimizer steps trains all trained steps of its samples. The flow_grpo preset's epoch
    (1,152 samples x 9 trained steps, 2 optimizer steps): every sample's 9 items lie in one step, each step holds 576
    samples, and step j trains the same items on 1 GPU as on 8 (each GPU an equal slice). With the items spread item
    by item (trajectory 1, as FDFO) only about 2 / 2^9 = 0.4 % of the samples would be whole."""
    from fdfo.config import PRESETS, batch_geometry
    from fdfo.phases import item_steps

    cfg = PRESETS["flow_grpo"]()
    samples, k = 48 * 24, grpo.trained_steps(cfg.sample.num_solver_steps)
    assert grpo.WHOLE_TRAJECTORIES and not nft.WHOLE_TRAJECTORIES and k == 9
    by_world = {}
    for world in (1, 8):
        geom = batch_geometry(cfg, world)
        ranks = [item_steps(samples * k, cfg, geom, 3, r, trajectory=k) for r in range(world)]
        assert len({len(step) for steps in ranks for step in steps}) == 1  # equal slices
        by_world[world] = [torch.cat([steps[j] for steps in ranks]).sort().values for j in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(by_world[1], by_world[8], strict=True))
    step_of = torch.empty(samples * k, dtype=torch.long)
    for j, ids in enumerate(by_world[1]):
        step_of[ids] = j
    per_sample = step_of.reshape(samples, k)
    assert (per_sample == per_sample[:, :1]).all() and int((per_sample[:, 0] == 0).sum()) == 576
    spread = item_steps(samples * k, cfg, batch_geometry(cfg, 1), 3, 0)
    step_of[spread[1]] = 1
    step_of[spread[0]] = 0
    whole = (step_of.reshape(samples, k) == step_of.reshape(samples, k)[:, :1]).all(dim=1).float().mean()
    assert whole < 0.02
