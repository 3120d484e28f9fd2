"""The deterministic Euler sampler of evaluation (docs/algorithm.md §1), against an exactly solvable flow."""

import torch

from fdfo.sampling import RawChurn, sample_euler, sample_pairs


def point_mass_velocity(target):
    """Exact velocity of the rectified flow whose data is the single point `target`: v = (x - target) / sigma.

    From x = (1 - s) m + s e and v = e - m. An Euler step from t to s then gives x_s - m = (x_t - m) s / t, the exact
    flow, so every step lands on the straight path and the last one on `target` itself, whatever the sigma grid.
    """
    def velocity(x, sigma, cond):
        assert cond == "cond" and sigma.shape == (len(x),)
        return (x - target) / sigma.reshape(-1, 1, 1, 1)
    return velocity


def test_euler_lands_on_the_point_mass_for_any_grid():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 2, 2, generator=gen)
    x1 = torch.randn(3, 4, 2, 2, generator=gen)
    for sigmas in (torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0]),
                   torch.linspace(1, 0, 41) ** 2):
        out = sample_euler(point_mass_velocity(target), x1, "cond", sigmas)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_euler_is_the_paired_sampler_without_churn():
    """With zero churn both branches of sample_pairs are plain Euler trajectories: the same final latent."""
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 3, 4, 4, generator=gen)
    weight = torch.randn(3, 3, generator=gen)

    def velocity(x, sigma, cond):  # a nonlinear field, so a wrong step size or order shows
        return torch.einsum("ij,bjhw->bihw", weight, torch.tanh(x)) * (1 + sigma.reshape(-1, 1, 1, 1))

    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    pairs = sample_pairs(velocity, x1, None, sigmas, RawChurn(weight=0.0), lambda k: torch.zeros(4, 3, 4, 4),
                         torch.zeros(2, 2))
    out = sample_euler(velocity, x1, None, sigmas)
    torch.testing.assert_close(pairs.final[0::2], out, atol=1e-6, rtol=0)
    torch.testing.assert_close(pairs.final[1::2], out, atol=1e-6, rtol=0)
    by_hand = x1.clone()
    for t, s in zip(sigmas[:-1], sigmas[1:]):
        by_hand = by_hand + (s - t) * velocity(by_hand, t.expand(2), None)
    torch.testing.assert_close(out, by_hand, atol=1e-6, rtol=0)
