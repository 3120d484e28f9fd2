"""The toy testbed (fdfo/toy): exact velocity, FDFO's update direction, every method improving, the CLI's JSON."""

import json

import pytest
import torch

from fdfo.toy import methods
from fdfo.toy.__main__ import main
from fdfo.toy.flows import ResidualNet, exact_velocity, make_problem, model_velocity
from fdfo.toy.run import ToyConfig, direction_cosines, make_context, run


def test_exact_velocity_matches_tweedie_score():
    # Independent route: p_sigma is the mixture of N((1 - sigma) m_k, c^2 I); Tweedie gives
    # E[(1 - sigma) x0 | x] = x + sigma^2 grad log p_sigma(x), and v = E[e - x0 | x] = (x - E[x0 | x]) / sigma.
    problem = make_problem(dim=3, prompts=2, modes=4, mode_std=0.2, seed=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g) * 1.5
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.6])
    prompt = torch.tensor([0, 1, 0, 1, 0, 1])
    expected = []
    for i in range(6):
        s = sigma[i].item()
        c = ((1 - s) ** 2 * 0.2**2 + s**2) ** 0.5
        mixture = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(torch.ones(4)),
            torch.distributions.Independent(torch.distributions.Normal((1 - s) * problem.means[prompt[i]], c), 1),
        )
        xi = x[i].clone().requires_grad_()
        (score,) = torch.autograd.grad(mixture.log_prob(xi), xi)
        x0_mean = (x[i] + s**2 * score) / (1 - s)
        expected.append((x[i] - x0_mean) / s)
    torch.testing.assert_close(exact_velocity(problem, x, sigma, prompt), torch.stack(expected), atol=1e-4, rtol=1e-4)


def test_network_starts_as_the_exact_flow():
    problem = make_problem(dim=4, prompts=3, modes=2, mode_std=0.1, seed=0)
    net = ResidualNet(4, 3, hidden=16)
    x, sigma, prompt = torch.randn(5, 4), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    exact = exact_velocity(problem, x, sigma, prompt)
    torch.testing.assert_close(model_velocity(problem, net, x, sigma, prompt), exact)


def test_fdfo_expected_update_points_along_the_true_gradient():
    # Measured expected-update cosines at initialisation, 2-D, one prompt, smooth reward, 64 batches of 32 samples
    # against 8192-sample backprop: 0.975 / 0.999 / 0.997 for seeds 0 / 1 / 2 (single batches: 0.70 / 0.95 / 0.93).
    cfg = ToyConfig(algorithm="fdfo", seed=1, samples_per_epoch=32, cosine_batches=64, true_grad_samples=8192)
    cosine = direction_cosines(make_context(cfg), cfg)
    assert cosine["expected"] >= 0.95
    assert cosine["expected"] > cosine["per_batch_mean"]  # averaging batches removes noise, not bias


# Reward gain after 384 reward evaluations (2-D, one prompt, smooth reward, 32 samples per epoch) measured on seeds
# 0-5: fdfo 0.154 0.189 0.087 0.205 0.032 0.165; flow_grpo 0.582 0.303 0.209 0.348 0.227 0.395; diffusion_nft
# 0.522 0.248 0.153 0.258 0.443 0.560; backprop 1.012 0.470 0.354 0.425 1.365 0.782. Thresholds ~half the minimum.
GAINS = {
    "fdfo": ({"lr": 3e-3, "clip": 0.3, "churn": 0.2}, 0.015),
    "flow_grpo": ({"lr": 3e-3, "clip": 1e-2}, 0.1),
    "diffusion_nft": ({"lr": 3e-3, "nft_beta": 0.1}, 0.07),
    "backprop": ({"lr": 3e-3}, 0.15),
}


@pytest.mark.parametrize("algorithm", sorted(GAINS))
def test_every_method_raises_the_toy_reward(algorithm):
    knobs, margin = GAINS[algorithm]
    result = run(ToyConfig(algorithm=algorithm, seed=0, samples_per_epoch=32, evaluations=384, eval_per_prompt=32,
                           eval_every=100, **knobs))
    assert result["final"]["evaluations"] == 384
    assert result["final"]["reward"] - result["curve"][0]["reward"] >= margin


def test_every_method_spends_one_reward_evaluation_per_sample():
    calls = []
    for algorithm in sorted(methods.METHODS):
        ctx = make_context(ToyConfig(algorithm=algorithm, dim=3, prompts=2, hidden=8))
        reward = ctx.reward
        ctx.reward = lambda problem, x, prompt, reward=reward: calls.append(len(x)) or reward(problem, x, prompt)
        opt = torch.optim.Adam(ctx.net.parameters(), lr=1e-3)
        methods.train_epoch(ctx, algorithm, opt, samples=16, grad_steps=2, epoch=0)
        assert sum(calls) == 16, algorithm
        calls.clear()


def test_quick_cli_writes_json_and_plot(tmp_path, capsys):
    main(["--quick", "--evaluations", "128", "--cosine-batches", "2", "--true-grad-samples", "256",
          "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert [c["evaluations"] for c in result["curve"]] == [0, 128] and result["diverged"] is None
    assert set(result["final"]) == {"evaluations", "reward", "modes", "spread", "pairwise"}
    assert -1 <= result["cosine"]["expected"] <= 1
    first, wrote = capsys.readouterr().out.splitlines()
    curve = result["curve"]
    assert first == (f"quick check: fdfo on the 2-D toy flow (1 prompt, smooth reward) went from reward "
                     f"{curve[0]['reward']:.4f} to {curve[1]['reward']:.4f} in 128 reward evaluations, update "
                     f"direction at cosine {result['cosine']['expected']:.2f} to the true gradient; this 2-point "
                     "curve only shows that the tool works and is not a result (docs/toy.md has the comparison of "
                     "the methods).")
    assert wrote == f"wrote {tmp_path}/result.json and {tmp_path}/curves.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "result.json"]  # no temporary files


def test_user_errors_name_the_flag():
    with pytest.raises(ValueError, match="--samples-per-epoch .* multiple of --group"):
        run(ToyConfig(algorithm="flow_grpo", samples_per_epoch=12, group=8))
    with pytest.raises(ValueError, match="--clip must be a finite number > 0"):
        run(ToyConfig(clip=0.0))


BAD_NUMBERS = [
    (dict(lr=float("nan")), "--lr must be a finite number > 0, got nan"),
    (dict(lr=float("inf")), "--lr must be a finite number > 0, got inf"),
    (dict(lr=-1e-3), "--lr must be a finite number > 0, got -0.001"),
    (dict(mode_std=float("inf")), "--mode-std must be a finite number > 0, got inf"),
    (dict(mode_std=0.0), "--mode-std must be a finite number > 0, got 0.0"),
    (dict(churn=-0.1), r"--churn must be a finite number >= 0 \(0: no churn\), got -0.1"),
    (dict(churn=float("nan")), "--churn must be a finite number >= 0"),
    (dict(kl=float("inf")), r"--kl must be a finite number >= 0 \(0: no KL term\), got inf"),
    (dict(kl=-0.5), "--kl must be a finite number >= 0"),
    (dict(clip=float("nan")), "--clip must be a finite number > 0, got nan"),
    (dict(nft_beta=float("-inf")), "--nft-beta must be a finite number > 0"),
    (dict(cosine_batches=-1), r"--cosine-batches must be >= 0 \(0: no direction measurement\), got -1"),
    (dict(eval_per_prompt=1), "--eval-per-prompt must be >= 2 .*pairwise.*, got 1"),
    (dict(steps=1), "--steps must be >= 2"),
    (dict(samples_per_epoch=7), "--samples-per-epoch must be even"),
    (dict(algorithm="diffusion_nft", group=1, samples_per_epoch=8), "--group must be >= 2 for --algorithm"),
]


def test_every_number_is_checked_before_any_work(monkeypatch):
    from fdfo.toy import run as toy_run

    monkeypatch.setattr(toy_run, "make_context", lambda cfg: pytest.fail("the run started"))
    for knobs, message in BAD_NUMBERS:
        with pytest.raises(ValueError, match=message):
            run(ToyConfig(**knobs))


def test_sizes_that_do_not_fit_are_refused_with_an_estimate(monkeypatch):
    from fdfo.toy import checks
    from fdfo.toy import run as toy_run

    # the estimate by hand for the defaults (4 modes, d = 2, width 128, T = 10, 64 samples per epoch, 32 evaluation
    # samples, 1 prompt): per (state, step) 4 bytes x (4 x 4 x 2 + 8 x 128 + 8 x 2) = 4288; training 64 x 10 states;
    # 23,056 parameters x 4 copies + the 4 x 2 mode centres, in float32
    need, phase = checks.memory_estimate(ToyConfig())
    assert need == 64 * 10 * 4288 + 4 * (4 * 23_056 + 8) and phase.startswith("training")
    need, phase = checks.memory_estimate(ToyConfig(prompts=64, eval_per_prompt=4096))
    assert phase.startswith("evaluation") and need > 64 * 4096 * 4096 * 4  # the [prompts, n, n] pairwise distances
    monkeypatch.setattr(toy_run, "make_context", lambda cfg: pytest.fail("the run started"))
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)  # this machine, as far as the check knows: 1 GiB
    # 1600 x 10 states x 4 x (4 x 50 x 100,000 + 8 x 128 + 8 x 100,000) bytes + 4 x (4 x 25,622,544 parameters
    # + 50 x 100,000 centres) = 1,331,695,496,704 bytes = 1,240.2 GiB
    with pytest.raises(ValueError, match=r"these sizes need about 1,240\.2 GiB of memory \(training: "
                                         r"--samples-per-epoch x --steps states\), more than the 1\.0 GiB available; "
                                         r"lower --dim, --modes"):
        run(ToyConfig(dim=100_000, modes=50, samples_per_epoch=1600))
    monkeypatch.undo()
    assert checks.available_memory() > 0  # read from /proc/meminfo (or the physical memory)


def test_a_diverging_run_says_so_exits_non_zero_and_writes_strict_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--lr", "1e30", "--evaluations", "128", "--samples-per-epoch", "32", "--eval-every", "1", "--hidden",
              "16", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == f"wrote {tmp_path}/result.json and {tmp_path}/curves.png\n"
    assert err == ("error: the run diverged at 32 evaluations: the evaluated reward became NaN or infinite "
                   "(result.json keeps the curve up to there). Lower --lr (now 1e+30) or the trust region "
                   "(--clip 0.03).\n")

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    result = json.loads((tmp_path / "result.json").read_text(), parse_constant=refuse)
    assert result["diverged"] == 32 and result["final"] == {"evaluations": 32, "reward": None, "modes": None,
                                                            "spread": None, "pairwise": None}
    assert result["curve"][0]["reward"] < 0 and len(result["curve"]) == 2


def test_cli_checks_out_and_shows_the_module_in_usage(tmp_path, capsys, monkeypatch):
    from fdfo.toy import run as toy_run
    from fdfo.toy import sweep

    monkeypatch.setattr(toy_run, "make_context", lambda cfg: pytest.fail("the run started"))
    (tmp_path / "file").write_text("")
    for module, args in ((main, ["--out", str(tmp_path / "file")]), (sweep.main, ["--out", str(tmp_path / "file")])):
        with pytest.raises(SystemExit) as e:
            module(args)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: --out {str(tmp_path / 'file')!r} is a file; give a folder path\n"
    for module, name in ((main, "fdfo.toy"), (sweep.main, "fdfo.toy.sweep")):
        with pytest.raises(SystemExit):
            module(["--help"])
        assert f"usage: python -m {name} [-h]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path / "s"), "--settings", "3d"])
    assert "error: --settings 3d: no such setting; choose from 2d 2d_quantised d256 d64" in capsys.readouterr().err


def test_sweep_records_a_diverged_run_and_never_selects_it(tmp_path, monkeypatch, capsys):
    from fdfo.toy import sweep

    base = ToyConfig(samples_per_epoch=32, evaluations=64, eval_per_prompt=8, eval_every=1, hidden=16)
    monkeypatch.setattr(sweep, "SETTINGS", {"tiny": base})
    monkeypatch.setattr(sweep, "GRID", {"fdfo": [{"lr": 1e30}, {"lr": 1e-3}], "backprop": [{"lr": 1e30}]})
    sweep.main(["--out", str(tmp_path), "--settings", "tiny", "--cosine-batches", "0"])

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    summary = json.loads((tmp_path / "tiny.json").read_text(), parse_constant=refuse)
    fdfo_grid = summary["tuning"]["fdfo"]["grid"]
    assert fdfo_grid[0]["mean"] is None and fdfo_grid[0]["diverged"] == [32, 32]
    assert fdfo_grid[1]["diverged"] == [None, None] and summary["settings"]["fdfo"] == {"lr": 1e-3}
    backprop = summary["table"]["backprop"]  # its only setting diverges on every fresh seed
    assert backprop["diverged"] == [32, 32, 32] and backprop["final_reward_mean"] is None
    assert backprop["final_reward_per_seed"] == [None, None, None]
    assert summary["table"]["fdfo"]["diverged"] == [None, None, None]
    capsys.readouterr()
    sweep.main(["--out", str(tmp_path), "--settings", "tiny", "--report-only"])
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("| backprop | lr 1e+30 | diverged (- / - / -) |") for r in rows), rows


def test_toy_flow_grpo_kl_term_uses_the_sde_std_without_dt():
    """The toy's Flow-GRPO loss adds beta * mean((mu - mu_ref)^2) / (2 std^2) with std = a sqrt(sigma / (1 - sigma))
    (no (-dt) factor), the same KL as the SD3 loss: the loss difference between beta and 0 is hand-computed."""
    from fdfo.algorithms import flow_grpo as grpo

    ctx = make_context(ToyConfig(algorithm="flow_grpo", dim=3, prompts=2, steps=4, seed=0))
    with torch.no_grad():  # move the network off the base flow, so mu - mu_ref is not zero
        for p in ctx.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    build, loss_fn = methods.METHODS["flow_grpo"]
    items = build(ctx, 8)
    items.pop("reward")
    with torch.no_grad():
        ctx.hyper.kl = 0.0
        without = loss_fn(ctx, items)
        ctx.hyper.kl = 0.25
        with_kl = loss_fn(ctx, items)
        v = model_velocity(ctx.problem, ctx.net, items["x"], items["sigma"], items["prompt"])
        _, mean, _ = grpo.sde_step(items["x"], v, items["sigma"], items["next"], torch.zeros_like(items["x"]),
                                   ctx.hyper.sde_a, ctx.sigmas[1])
        sigma = items["sigma"]
        std = ctx.hyper.sde_a * torch.sqrt(sigma / torch.where(sigma >= 1, 1 - ctx.sigmas[1], 1 - sigma))
        kl = ((mean - items["mean_ref"]) ** 2).mean(1) / (2 * std**2)
    assert float(kl.mean()) > 0
    torch.testing.assert_close(with_kl - without, 0.25 * kl.mean(), rtol=1e-5, atol=1e-8)
