"""DiffusionNFT's rollout solver, DPM-Solver++(2M) in data prediction (fdfo/algorithms/dpm_solver.py), against hand
steps and an analytic flow whose exact ODE solution is known."""

import math

import torch

from fdfo.algorithms import dpm_solver as dpm


def test_second_order_step_hand_value():
    # sigma 0.75 -> 0.5 -> 0.25: lambda = -log 3, 0, log 3, so h = h_prev = log 3 and r = 1;
    # D = 1.5 * 0.4 - 0.5 * 0.2 = 0.5; x = (0.25 / 0.5) * 1 - 0.75 (1/3 - 1) 0.5 = 0.5 + 0.25 = 0.75
    out = dpm.dpm_step(torch.ones(1), torch.tensor([0.4]), 0.5, 0.25, torch.tensor([0.2]), 0.75)
    assert out.item() == 0.75
    # without the previous prediction: first order, (0.25 / 0.5)(1 - 0.5 * 0.4) + 0.75 * 0.4 = 0.4 + 0.3
    assert abs(dpm.dpm_step(torch.ones(1), torch.tensor([0.4]), 0.5, 0.25).item() - 0.7) < 1e-7
    # right after sigma = 1, lambda_prev = -inf: r = inf and the correction vanishes
    first = dpm.dpm_step(torch.ones(1), torch.tensor([0.4]), 0.5, 0.25, torch.tensor([9.0]), 1.0)
    assert abs(first.item() - 0.7) < 1e-7


def test_first_steps_and_last_step_are_first_order():
    # v = 2 x + sigma from x = 1 over sigma 1, 0.6, 0.3, 0 (by hand): step 0 is Euler, x = 1 - 0.4 * 3 = -0.2;
    # step 1 (previous level 1): first order, x0 = -0.2 - 0.6 * 0.2 = -0.32, x = 0.5 (-0.2 + 0.4 * 0.32) + 0.7 (-0.32)
    # = -0.26; the last step returns x0 = -0.26 - 0.3 (2 (-0.26) + 0.3) = -0.194
    sigmas = [1.0, 0.6, 0.3, 0.0]
    out = dpm.sample_dpm2m(lambda x, i: 2 * x + sigmas[i], torch.ones(1, dtype=torch.float64), sigmas)
    assert abs(out.item() + 0.194) < 1e-6


def _gaussian_flow(mu, s):
    """Data N(mu, s^2) per element: the exact velocity E[e - x0 | x_sigma = x] and the ODE's end point mu + s x1."""
    def velocity(sigmas):
        def v(x, i):
            sigma = sigmas[i]
            var = (1 - sigma) ** 2 * s * s + sigma * sigma
            centred = x.double() - (1 - sigma) * mu
            return sigma / var * centred - (mu + (1 - sigma) * s * s / var * centred)
        return v
    return velocity, lambda x1: mu + s * x1


def test_second_order_convergence_on_a_gaussian_target():
    velocity, exact = _gaussian_flow(0.7, 2.0)
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    errors, euler = [], []
    for steps in (20, 40, 80):
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        errors.append(float((dpm.sample_dpm2m(velocity(sigmas), x1, sigmas) - exact(x1)).abs().max()))
        x, v = x1.clone(), velocity(sigmas)
        for i in range(steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * v(x, i)
        euler.append(float((x - exact(x1)).abs().max()))
    # measured 3.34, 3.42 (towards 4: the end steps in lambda do not shrink with T); Euler 1.9-2.0
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.0 < r < 4.5 for r in ratios), ratios
    assert all(1.7 < euler[i] / euler[i + 1] < 2.2 for i in range(2))
    assert errors[-1] < euler[-1] / 5


def test_integer_timesteps_truncate_as_the_authors():
    t = torch.linspace(1, 0, 11)
    sigmas = 3 * t / (1 + 2 * t)  # SD3.5's shift-3 grid
    told = dpm.integer_timestep_sigmas(sigmas)
    expected = [math.floor(float(torch.tensor(s, dtype=torch.float32) * 1000)) for s in sigmas.tolist()]
    assert [round(float(s) * 1000) for s in told] == expected
    assert (told * 1000 - torch.tensor(expected, dtype=torch.float32)).abs().max() < 1e-4
    assert expected[1] == 964  # 3 * 0.9 / 2.8 = 0.96428..: t = 964, not 964.28


def test_diffusion_nft_rollout_samples_with_the_solver_and_integer_timesteps():
    from fdfo.algorithms import diffusion_nft

    told = []

    class Policy:  # v = x / 2 + sigma_told: the final sample depends on every level the model is told
        def velocity(self, x, sigma, cond, module=None):
            told.append(sigma.clone())
            return x / 2 + sigma.reshape(-1, 1)

        base_velocity = velocity

    t = torch.linspace(1, 0, 6)
    sigmas = 3 * t / (1 + 2 * t)  # 1, 0.923.., 0.818.., 0.666.., 0.428.., 0
    x1 = torch.linspace(-1, 1, 16).reshape(2, 8)
    gen = torch.Generator().manual_seed(0)
    x0, _ = diffusion_nft.rollout(Policy(), x1, {}, sigmas, lambda: torch.randn(2, 8, generator=gen), None)
    levels = [round(float(s[0]) * 1000) for s in told[:5]]
    assert levels == [1000, 923, 818, 666, 428]  # int(1000 sigma), truncated (666.67 -> 666); the update keeps sigma
    hand = dpm.sample_dpm2m(lambda x, i: x / 2 + levels[i] / 1000, x1, sigmas.double().tolist())
    torch.testing.assert_close(x0, hand)
    euler = x1.clone()
    for i in range(5):
        euler = euler + (sigmas[i + 1] - sigmas[i]) * (euler / 2 + levels[i] / 1000)
    assert (x0 - euler).abs().max() > 1e-3  # not the Euler sampler it replaced
