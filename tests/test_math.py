"""The FDFO math against hand-derived values and independent re-derivations (docs/algorithm.md §2–§4)."""

import math

import pytest
import torch

from fdfo.objective import clip_fraction, pair_targets, spo_loss
from fdfo.sampling import (
    CHURN_DRAWS,
    IntervalChurn,
    PriorChurn,
    RawChurn,
    churn_step,
    make_churn,
    prior_churn,
    sample_pairs,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- churn -------------------------------------------------------------------------------------------------------------


def test_churn_step_with_zero_gamma_is_the_euler_step():
    g = _gen()
    x, v, n = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    out = churn_step(x, v, 0.7, 0.4, 0.0, n)
    torch.testing.assert_close(out, x + (0.4 - 0.7) * v, rtol=0, atol=1e-6)


def test_churn_step_scalar_hand_value():
    # t = 0.5, s = 0.25, gamma = 1: r = 0.25 / 1.75 = 1/7; x' = 1 + (1/7 - 1/2) * 2 = 2/7;
    # x_s = (2/7 + 1 * (1/7) * sqrt(3)) / (1 + 1/7) = (2 + sqrt(3)) / 8
    out = churn_step(torch.ones(1, 1), 2 * torch.ones(1, 1), 0.5, 0.25, 1.0, torch.ones(1, 1))
    assert out.item() == pytest.approx((2 + math.sqrt(3)) / 8, abs=1e-6)


@pytest.mark.parametrize("t,s,gamma", [(1.0, 0.8, 0.3), (0.6, 0.3, 0.05), (0.3, 0.1, 2.0), (0.2, 0.0, 0.5)])
def test_churn_step_maps_a_flow_state_to_the_next_level(t, s, gamma):
    # x_t = (1 - t) x0 + t e with the exact velocity v = e - x0 must land on data weight 1 - s and noise std s.
    g = _gen(1)
    n = 400_000
    x0 = 0.5 + 0.7 * torch.randn(n, generator=g)
    e = torch.randn(n, generator=g)
    x_t = (1 - t) * x0 + t * e
    out = churn_step(x_t[:, None], (e - x0)[:, None], t, s, gamma, torch.randn(n, 1, generator=g))[:, 0]
    x0c = x0 - x0.mean()
    weight = (out * x0c).mean() / x0c.square().mean()
    residual = out - (1 - s) * x0
    assert weight.item() == pytest.approx(1 - s, abs=5e-3)
    assert residual.mean().item() == pytest.approx(0.0, abs=5e-3)
    assert residual.std().item() == pytest.approx(s, abs=5e-3)


def test_churn_step_per_sample_gamma_matches_scalar_calls():
    g = _gen(2)
    x, v, n = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    gammas = torch.tensor([0.0, 0.1, 0.7])
    out = churn_step(x, v, 0.9, 0.5, gammas, n)
    for i, gamma in enumerate(gammas.tolist()):
        torch.testing.assert_close(out[i], churn_step(x[i:i + 1], v[i:i + 1], 0.9, 0.5, gamma, n[i:i + 1])[0])
    torch.testing.assert_close(out[0], x[0] - 0.4 * v[0])


def test_prior_churn_keeps_unit_variance():
    g = _gen(3)
    x = torch.randn(500_000, generator=g)
    out = prior_churn(x, 0.3, torch.randn(500_000, generator=g))
    assert out.std().item() == pytest.approx(1.0, abs=4e-3)
    # the kept part of x is 1 / (1 + gamma)
    assert (out * x).mean().item() == pytest.approx(1 / 1.3, abs=4e-3)
    torch.testing.assert_close(prior_churn(x, 0.0, torch.randn(500_000, generator=g)), x)


GRID = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # T = 4 levels 1, 0.75, 0.5, 0.25, then the final 0


def test_raw_churn_gamma_is_w_itself_shifted_by_one_level_and_zero_on_the_last_step():
    prior, steps = RawChurn(0.1)(GRID, torch.zeros(3, CHURN_DRAWS))
    assert torch.equal(prior, torch.full((3,), 0.1))  # gamma = w exactly, not exp(w) - 1 = 0.10517
    assert torch.equal(steps, torch.tensor([[0.1, 0.1, 0.1, 0.0]] * 3))


def test_prior_churn_schedule_hand_values():
    z = torch.tensor([[0.0, 5.0], [1.0, -3.0]])  # only the first draw of a pair is used
    prior, steps = PriorChurn()(GRID, z)
    # w = exp(log 0.1 + 1.0 * z0): 0.1 and 0.1 e; gamma = exp(w) - 1
    expected = torch.tensor([math.exp(0.1) - 1, math.exp(0.1 * math.e) - 1])
    torch.testing.assert_close(prior, expected, rtol=1e-6, atol=0)
    assert torch.equal(steps, torch.zeros(2, 4))


def test_interval_churn_schedule_hand_values():
    # z0 = -2/3 puts mu = 1 + 1.5 z0 at 0 = logit(0.5); logit(0.75) = ln 3 = -logit(0.25); sigma = 1 gets 0.
    z = torch.tensor([[-2.0 / 3.0, 0.7], [40.0, 0.0]])
    prior, steps = IntervalChurn()(GRID, z)

    def density(sigma, mu):
        logit = math.log(sigma / (1 - sigma))
        return math.exp(-((logit - mu) ** 2) / (2 * 0.25**2)) / (math.sqrt(2 * math.pi) * 0.25 * sigma * (1 - sigma))

    p = [0.0] + [density(s, 0.0) for s in (0.75, 0.5, 0.25)]
    p = [q / sum(p) for q in p]
    c = [math.exp(1.0 * q) - 1 for q in p]  # w = exp(log 1.0 + 0 * z1) = 1
    assert prior[0].item() == 0.0
    torch.testing.assert_close(steps[0], torch.tensor([c[1], c[2], c[3], 0.0]), rtol=1e-6, atol=0)
    assert steps[0, 0].item() == pytest.approx(steps[0, 2].item(), rel=1e-5)  # symmetric about sigma = 0.5
    # mu = 61: every density underflows to 0, so the levels are uniform 1/T = 1/4 (sigma = 1 included)
    c_uniform = math.exp(0.25) - 1
    assert prior[1].item() == pytest.approx(c_uniform, rel=1e-6)
    torch.testing.assert_close(steps[1], torch.tensor([c_uniform] * 3 + [0.0]), rtol=1e-6, atol=0)
    # the weight draw: w = exp(log w0 + log_std z1)
    _, steps = IntervalChurn(weight=2.0, log_std=0.5)(GRID, z[:1])
    w = math.exp(math.log(2.0) + 0.5 * 0.7)
    torch.testing.assert_close(steps[0], torch.tensor([math.exp(w * q) - 1 for q in p[1:]] + [0.0]), rtol=1e-6, atol=0)


def test_make_churn_defaults_and_errors():
    assert make_churn("raw") == RawChurn(0.0025)
    assert make_churn("interval") == IntervalChurn(1.0) and make_churn("prior") == PriorChurn(0.1)
    assert make_churn("raw", 0.2) == RawChurn(0.2)
    with pytest.raises(ValueError, match="churn-schedule 'bogus'"):
        make_churn("bogus", 0.1)
    with pytest.raises(ValueError, match="churn-weight"):
        make_churn("raw", -1.0)


def test_both_branches_of_a_pair_share_its_schedule():
    x1 = torch.randn(2, 3, generator=_gen(9))
    noise = torch.randn(4, 3, generator=_gen(10))
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # pair 0: gamma e^0.1 - 1; pair 1: e^(0.1 e) - 1
    traj = sample_pairs(lambda x, s, c: torch.zeros_like(x), x1, None, torch.tensor([1.0, 0.5, 0.0]), PriorChurn(),
                        lambda k: noise, z)
    gamma = torch.tensor([math.exp(0.1) - 1] * 2 + [math.exp(0.1 * math.e) - 1] * 2)
    torch.testing.assert_close(traj.final, prior_churn(x1.repeat_interleave(2, 0), gamma, noise))


# -- the paired sampler ------------------------------------------------------------------------------------------------


def _toy_velocity(x, sigma, cond):
    return torch.tanh(x) * sigma.reshape(-1, 1) + cond


def test_sample_pairs_without_churn_is_plain_euler_and_branches_agree():
    g = _gen(4)
    x1 = torch.randn(3, 5, generator=g)
    cond = torch.randn(6, 5, generator=g)
    cond[1::2] = cond[0::2]  # same prompt in both branches
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    traj = sample_pairs(_toy_velocity, x1, cond, sigmas, RawChurn(0.0), lambda k: torch.randn(6, 5), torch.zeros(3, 2))
    x = x1.clone()
    for k in range(3):
        v = _toy_velocity(x, sigmas[k].expand(3), cond[0::2])
        torch.testing.assert_close(traj.states[0::2, k], x)
        torch.testing.assert_close(traj.velocities[0::2, k], v)
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    torch.testing.assert_close(traj.final[0::2], x)
    torch.testing.assert_close(traj.final[1::2], traj.final[0::2])
    assert traj.states.shape == (6, 3, 5) and torch.equal(traj.sigmas, sigmas[:-1])


def test_sample_pairs_with_churn_uses_the_noise_in_order():
    g = _gen(5)
    x1 = torch.randn(2, 3, generator=g)
    cond = torch.zeros(4, 3)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    noises = {k: torch.randn(4, 3, generator=g) for k in (-1, 0, 1)}
    churn = RawChurn(0.1)
    traj = sample_pairs(_toy_velocity, x1, cond, sigmas, churn, noises.__getitem__, torch.zeros(2, 2))
    gamma = 0.1  # raw: gamma is the weight itself
    x = prior_churn(x1.repeat_interleave(2, 0), gamma, noises[-1])
    torch.testing.assert_close(traj.states[:, 0], x)
    x = churn_step(x, _toy_velocity(x, sigmas[0].expand(4), cond), 1.0, 0.5, gamma, noises[0])
    torch.testing.assert_close(traj.states[:, 1], x)
    x = x + (0.0 - 0.5) * _toy_velocity(x, sigmas[1].expand(4), cond)  # the last step never churns
    torch.testing.assert_close(traj.final, x)
    assert not torch.allclose(traj.final[0], traj.final[1])  # the branches differ only by churn


# -- finite-difference targets -----------------------------------------------------------------------------------------


def test_pair_targets_hand_example():
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0])  # a0, b0, a1, b1
    latents = torch.tensor([[1.0, 3.0], [-1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    dR, dx = pair_targets(rewards, latents)
    assert dR.tolist() == [1.0, -1.0, -1.0, 1.0]
    # pair 0: (a - b)/2 = [1, 1], mean square 1; pair 1: (a - b)/2 = [-1, 0], mean square 0.5
    expected = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-2.0, 0.0], [2.0, 0.0]])
    expected[:2] *= 1 / (1 + 1e-6)
    expected[2:] *= 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(dx, expected, rtol=0, atol=1e-7)


def test_pair_targets_identical_branches_give_finite_zeros():
    latents = torch.randn(1, 4, 2, 2).repeat(2, 1, 1, 1)
    dR, dx = pair_targets(torch.tensor([0.5, 0.5]), latents)
    assert torch.isfinite(dx).all() and (dx == 0).all() and (dR == 0).all()


def test_pair_targets_rejects_odd_batches():
    with pytest.raises(ValueError, match="interleaved pairs"):
        pair_targets(torch.zeros(3), torch.zeros(3, 2))


# -- the surrogate -----------------------------------------------------------------------------------------------------


def test_spo_ratio_is_one_and_gradient_is_2_dR_dx_over_N_at_the_reference():
    g = _gen(6)
    v_ref = torch.randn(3, 4, 2, 2, generator=g)
    dx = torch.randn(3, 4, 2, 2, generator=g)
    dR = torch.tensor([0.7, -0.2, 1.5])
    v = v_ref.clone().requires_grad_(True)
    loss, ratio = spo_loss(v, v_ref, dx, dR, 0.03)
    torch.testing.assert_close(ratio, torch.ones(3))
    torch.testing.assert_close(loss, -dR)
    loss.sum().backward()
    torch.testing.assert_close(v.grad, 2 * dR.reshape(-1, 1, 1, 1) * dx / 16)


def test_spo_loss_value_off_the_reference():
    # v = v* + delta (all elements): l = -delta^2, l_ref = -mean(dx^2) -> rho = exp(mean(dx^2) - delta^2)
    v_ref = torch.zeros(1, 4)
    dx = torch.tensor([[1.0, -1.0, 2.0, 0.0]])  # mean square 1.5
    delta = 1.3
    v = v_ref - dx + delta
    loss, ratio = spo_loss(v, v_ref, dx, torch.tensor([0.4]), 0.03)
    rho = math.exp(1.5 - delta ** 2)
    assert ratio.item() == pytest.approx(rho, rel=1e-6)
    assert loss.item() == pytest.approx(-0.4 * rho + 0.4 / 0.06 * (rho - 1) ** 2, rel=1e-5)  # float32


@pytest.mark.parametrize("dR", [0.5, -2.0])
def test_spo_quadratic_term_puts_the_optimum_at_the_clip_edge(dR):
    # As a function of rho, L = -dR rho + |dR|/(2 eps) (rho - 1)^2 is minimised at rho = 1 + eps * sign(dR):
    # moving further than eps from the sampling policy costs more than it gains.
    eps = 0.03
    rhos = torch.linspace(0.9, 1.1, 2001)
    # realise each rho with v = v* + delta: rho = exp(mean(dx^2) - delta^2); take mean(dx^2) = 1
    delta = torch.sqrt(1 - torch.log(rhos))
    n = len(rhos)
    loss, ratio = spo_loss(torch.zeros(n, 1) - 1 + delta[:, None], torch.zeros(n, 1), torch.ones(n, 1),
                           torch.full((n,), dR), eps)
    torch.testing.assert_close(ratio, rhos)
    best = ratio[loss.argmin()].item()
    assert best == pytest.approx(1 + eps * math.copysign(1, dR), abs=2e-4)
    inside, outside = loss[(ratio - 1).abs() < 0.01], loss[(ratio - 1).abs() > 0.06]
    assert outside.min() > inside.min()
    assert clip_fraction(ratio, eps).item() == pytest.approx(((rhos - 1).abs() > eps).float().mean().item())


# -- the FD direction on a toy problem ---------------------------------------------------------------------------------


def _gaussian_velocity(mu, s):
    """Exact flow velocity for data N(mu, s^2 I): v = (sigma - a s^2)/V (x - a mu) - mu, a = 1 - sigma."""

    def velocity(x, sigma, cond):
        sigma = sigma.reshape(-1, 1)
        a = 1 - sigma
        var = a.square() * s ** 2 + sigma.square()
        return (sigma - a * s ** 2) / var * (x - a * mu) - mu

    return velocity


def test_average_fd_direction_points_along_the_true_reward_gradient():
    # Linear reward R(x0) = w . x0: the mean of dR * dx over many pairs must align with grad R = w.
    dim, pairs = 16, 4000
    g = _gen(7)
    mu = torch.randn(dim, generator=g)
    w = torch.randn(dim, generator=g)
    x1 = torch.randn(pairs, dim, generator=g)
    sigmas = 3 * torch.linspace(1, 0, 21) / (1 + 2 * torch.linspace(1, 0, 21))  # SD3-style shift 3
    traj = sample_pairs(_gaussian_velocity(mu, 0.5), x1, None, sigmas, RawChurn(0.05),
                        lambda k: torch.randn(2 * pairs, dim, generator=g), torch.zeros(pairs, 2))
    dR, dx = pair_targets(traj.final @ w, traj.final)
    direction = (dR[:, None] * dx).mean(0)
    cosine = torch.nn.functional.cosine_similarity(direction, w, dim=0).item()
    assert cosine >= 0.9
    # and a reward that ignores x0 gives no direction at all
    dR0, _ = pair_targets(torch.zeros(2 * pairs), traj.final)
    assert (dR0 == 0).all()
