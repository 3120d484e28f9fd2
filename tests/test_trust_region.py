"""The opt-in SPO trust region in velocity units (fdfo.objective.spo_loss_velocity_region, the toy's --trust-region
velocity): hand values, an edge that does not depend on the branch separation, and the default path unchanged."""

import math

import pytest
import torch

from fdfo.objective import spo_loss, spo_loss_velocity_region
from fdfo.toy import methods
from fdfo.toy.run import ToyConfig, make_context, run


def test_hand_values():
    # dx = [2, 0]: mean(dx^2) = 2, c = 1 / (2 sqrt 2). v_ref = 0, v = [-0.5, 0.5]: v - (v_ref - dx) = [1.5, 0.5],
    # mean square 1.25, l - l_ref = -1.25 + 2 = 0.75, log rho = 0.75 / (2 sqrt 2)
    v, v_ref, dx = torch.tensor([[-0.5, 0.5]]), torch.zeros(1, 2), torch.tensor([[2.0, 0.0]])
    loss, ratio = spo_loss_velocity_region(v, v_ref, dx, torch.tensor([0.4]), 0.3)
    rho = math.exp(0.75 / (2 * math.sqrt(2)))
    assert ratio.item() == pytest.approx(rho, rel=1e-6)
    assert loss.item() == pytest.approx(-0.4 * rho + 0.4 / 0.6 * (rho - 1) ** 2, rel=1e-6)
    # the published ratio of the same item is exp(0.75)
    assert spo_loss(v, v_ref, dx, torch.tensor([0.4]), 0.3)[1].item() == pytest.approx(math.exp(0.75), rel=1e-6)


@pytest.mark.parametrize("separation", [0.01, 1.0])
def test_edge_is_a_velocity_change_whatever_the_separation(separation):
    # delta of rms `separation`; the FD target dx = delta / mean(delta^2) has rms r = 1 / separation. A move of rms t
    # along it, v = v_ref - t dx / r, gives l - l_ref = 2 t r - t^2: the variant's log rho = t - t^2 / (2 r), the
    # published one's 2 t r - t^2 (so its edge t = eps * separation / 2 shrinks with the separation).
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(1, 64, generator=g)
    delta *= separation / delta.square().mean().sqrt()
    dx = delta / delta.square().mean()
    r = dx.square().mean().sqrt().item()
    v_ref = torch.randn(1, 64, generator=g)
    t = 0.03
    v = v_ref - t * dx / r
    ratio = spo_loss_velocity_region(v, v_ref, dx, torch.ones(1), t)[1].item()
    assert math.log(ratio) == pytest.approx(t - t * t / (2 * r), rel=1e-3)
    assert ratio - 1 == pytest.approx(t, rel=0.03)  # the edge |rho - 1| = eps sits at a velocity change of ~eps
    published = spo_loss(v, v_ref, dx, torch.ones(1), t)[1].item()
    assert math.log(published) == pytest.approx(2 * t * r - t * t, rel=1e-3)


def test_gradient_at_the_reference_and_items_without_direction():
    g = torch.Generator().manual_seed(1)
    v_ref = torch.randn(3, 4, 2, generator=g)
    dx = torch.randn(3, 4, 2, generator=g)
    dx[2] = 0  # a dropped pair (dR = 0) or identical branches
    dR = torch.tensor([0.7, -0.2, 0.0])
    v = v_ref.clone().requires_grad_(True)
    loss, ratio = spo_loss_velocity_region(v, v_ref, dx, dR, 0.03)
    torch.testing.assert_close(ratio, torch.ones(3))
    torch.testing.assert_close(loss, -dR)
    loss.sum().backward()
    # d loss / d v = -dR c d l / d v = dR c 2 dx / n with c = 1 / (2 rms(dx)): dR dx / (n rms(dx)); zero for dx = 0
    rms = dx.flatten(1).square().mean(1).sqrt().clamp_min(1e-30).reshape(-1, 1, 1)
    torch.testing.assert_close(v.grad, dR.reshape(-1, 1, 1) * dx / (8 * rms))
    assert (v.grad[2] == 0).all()
    moved = spo_loss_velocity_region(v_ref + 1, v_ref, dx, dR, 0.03)
    assert moved[1][2].item() == 1.0 and moved[0][2].item() == 0.0


def _published_fdfo_loss(ctx, items):
    """fdfo_loss as it was before the variant existed."""
    v = methods.model_velocity(ctx.problem, ctx.net, items["state"], items["sigma"], items["prompt"])
    return spo_loss(v, items["v_ref"], items["dx"], items["dR"], ctx.hyper.clip)[0].mean()


def test_toy_default_is_the_published_loss_bit_for_bit(monkeypatch):
    cfg = ToyConfig(seed=3, samples_per_epoch=16, evaluations=64, eval_per_prompt=16, eval_every=2, lr=3e-3,
                    clip=0.3, churn=0.05)
    assert cfg.trust_region == "separation" and make_context(cfg).hyper.trust_region == "separation"
    default = run(cfg)
    velocity = run(ToyConfig(**{**cfg.__dict__, "trust_region": "velocity"}))
    assert make_context(ToyConfig(trust_region="velocity")).hyper.trust_region == "velocity"
    assert velocity["curve"][-1]["reward"] != default["curve"][-1]["reward"]  # the flag reaches the loss
    monkeypatch.setitem(methods.METHODS, "fdfo", (methods.fdfo_build, _published_fdfo_loss))
    reference = run(cfg)
    assert default["curve"] == reference["curve"]  # every logged float equal
