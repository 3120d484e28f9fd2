"""The toy's claim-(b) budget runs (fdfo.toy.budget) and diversity at equal reward (fdfo.toy.diversity), on hand
values: reading diversity at a reward level, dominance, the bounds of the evaluation ratio, the tuned knobs used."""

import json

import pytest

from fdfo.toy import budget, diversity, sweep
from fdfo.toy.run import ToyConfig


def _curve(rewards, pairwise, modes=None, step=100):
    modes = modes or [4.0] * len(rewards)
    return [{"evaluations": i * step, "reward": r, "pairwise": p, "modes": m, "spread": 0.1}
            for i, (r, p, m) in enumerate(zip(rewards, pairwise, modes))]


def test_diversity_is_read_at_the_first_crossing_interpolated_in_reward():
    # gap fractions (best 0, start -1): 0, 0.2, 0.5, 0.8
    curve = _curve([-1.0, -0.8, -0.5, -0.2], [1.0, 0.9, 0.6, 0.3])
    assert diversity.at_level(curve, "pairwise", 0.3, 0.0) == pytest.approx(0.8)  # 0.9 + (0.1 / 0.3) (0.6 - 0.9)
    assert diversity.at_level(curve, "pairwise", 0.5, 0.0) == pytest.approx(0.6)
    assert diversity.at_level(curve, "pairwise", 0.9, 0.0) is None
    assert diversity.at_level(curve, "pairwise", 0.0, 0.0) == 1.0
    # not monotone: the first crossing of 0.5 is between points 0 and 1 (fractions 0 and 0.6), not the later one
    curve = _curve([-1.0, -0.4, -0.9, -0.1], [2.0, 0.8, 1.5, 0.1])
    assert diversity.at_level(curve, "pairwise", 0.5, 0.0) == pytest.approx(2.0 + (0.5 / 0.6) * (0.8 - 2.0))
    # a bump-type reward (best 1) from 0.2: fractions 0, 0.5, 1
    curve = _curve([0.2, 0.6, 1.0], [1.0, 0.5, 0.0], modes=[4.0, 3.0, 1.0])
    assert diversity.at_level(curve, "modes", 0.75, 1.0) == pytest.approx(2.0)
    # diverged before the level: no value
    curve = _curve([-1.0, -0.9, None], [1.0, 0.9, None])
    assert diversity.at_level(curve, "pairwise", 0.5, 0.0) is None


def test_dominance_needs_every_seed_to_reach_and_to_be_higher():
    assert diversity.dominates([0.5, 0.4, 0.3], [0.4, 0.3, 0.2])
    assert not diversity.dominates([0.5, 0.4, 0.3], [0.4, 0.3, 0.3])  # a tie on one seed
    assert not diversity.dominates([0.5, None, 0.3], [0.4, 0.3, 0.2])  # one seed never reached the level
    a = [_curve([-1.0, -0.5, -0.1], [1.0, 0.8, 0.6])]  # fractions 0, 0.5, 0.9
    b = [_curve([-1.0, -0.5, -0.1], [1.0, 0.4, 0.7])]
    result = diversity.analyse({"a": a, "b": b}, 0.0)
    # at 0.1 ... 0.5: a = 1 - 0.4 f, b = 1 - 1.2 f; at 0.6 ... 0.9: a = 0.8 - 0.5 (f - 0.5), b = 0.4 + 0.75 (f - 0.5)
    assert result["values"]["pairwise"]["b"]["0.7"] == [pytest.approx(0.55)]
    assert result["dominance"]["pairwise"]["a > b"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # 0.8: 0.65, 0.625
    assert result["dominance"]["pairwise"]["b > a"] == [0.9]  # the lines cross at 0.82


def test_ratio_of_mean_evaluations_marks_its_bounds():
    assert budget.mean_bound([100, None, 300], 1000) == (pytest.approx(1400 / 3), True)
    assert budget.mean_bound([100, 200, 300], 1000) == (200, False)
    assert budget.ratio({"a": (100.0, False), "b": (350.0, False), "c": (200.0, True)}) == "1 : 3.5 : >2"
    assert budget.ratio({"a": (400.0, True), "b": (100.0, False), "c": (800.0, True)}) == "1 : <0.25 : ?"
    curve = _curve([-1.0, -0.9, -0.7, -0.4], [1.0] * 4)
    assert budget.gap_fraction(curve, 0.0) == pytest.approx(0.6)
    assert budget.peak(_curve([-1.0, -0.5, -0.8, -0.5, None], [1.0] * 5), 0.0) == (0.5, 100)  # first of the best
    table = budget.tabulate({m: [{"curve": curve, "config": {"seed": 0}, "knobs": {}, "diverged": None,
                                  "cpu_seconds": 1.0}] for m in budget.RATIO}, 300, 0.0)
    assert table["methods"]["fdfo"]["evals_to_reach"] == {"0.25": [200], "0.5": [300]}
    assert table["ratio"] == {"0.25": "1 : 1 : 1", "0.5": "1 : 1 : 1"}


def test_budget_runs_use_the_tuned_knobs_and_tabulate_them(tmp_path, monkeypatch, capsys):
    tiny = ToyConfig(samples_per_epoch=16, evaluations=32, eval_per_prompt=4, eval_every=1, hidden=8, group=4)
    monkeypatch.setattr(sweep, "SETTINGS", {"tiny": tiny})
    monkeypatch.setattr(budget, "SETTINGS", {"tiny": tiny})
    tuned = {"fdfo_velocity": {"lr": 2e-3, "clip": 0.2, "churn": 0.1}, "flow_grpo": {"lr": 5e-4, "clip": 0.01}}
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "tiny.json").write_text(json.dumps({"settings": tuned}))
    args = ["--sweep", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--settings", "tiny", "--seeds", "3"]
    budget.main(args + ["--methods", "fdfo_velocity", "flow_grpo", "--evaluations", "48"])
    fdfo = json.loads((tmp_path / "out" / "tiny" / "fdfo_velocity-seed3.json").read_text())
    config = fdfo["config"]
    assert (config["algorithm"], config["trust_region"], config["lr"], config["clip"], config["churn"],
            config["seed"], config["evaluations"]) == ("fdfo", "velocity", 2e-3, 0.2, 0.1, 3, 48)
    assert [c["evaluations"] for c in fdfo["curve"]] == [0, 16, 32, 48] and fdfo["knobs"] == tuned["fdfo_velocity"]
    summary = json.loads((tmp_path / "out" / "tiny-48.json").read_text())
    assert list(summary["methods"]) == ["fdfo_velocity", "flow_grpo"] and summary["ratio"] == {}
    assert "| flow_grpo | lr 0.0005, clip 0.01 |" in capsys.readouterr().out
    for extra, message in ((["--methods", "sde"], "--methods sde: no such method"),
                           (["--methods", "backprop"], "--methods backprop: not tuned in"),
                           (["--settings", "3d"], "--settings 3d: no such setting")):
        with pytest.raises(SystemExit) as e:
            budget.main(args + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir()) == ["fdfo_velocity-seed3.json",
                                                                            "flow_grpo-seed3.json"]


def test_diversity_cli_writes_tables_and_plot(tmp_path, capsys):
    a = [_curve([-1.0, -0.5, -0.1], [1.0, 0.8, 0.6])] * 3
    b = [_curve([-1.0, -0.5, -0.1], [1.0, 0.4, 0.7])] * 3
    (tmp_path / "2d.json").write_text(json.dumps({"curves": {"fdfo": a, "flow_grpo": b}}))
    diversity.main(["--sweep", str(tmp_path), "--settings", "2d", "--plot", str(tmp_path / "d.png")])
    out = capsys.readouterr().out
    assert "| 0.5 | 0.80 / 0.80 / 0.80 | 0.40 / 0.40 / 0.40 |" in out
    assert "* fdfo > flow_grpo: 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8\n" in out
    assert (tmp_path / "d.png").stat().st_size > 0
    saved = json.loads((tmp_path / "diversity-2d.json").read_text())
    assert saved["dominance"]["pairwise"]["flow_grpo > fdfo"] == [0.9]
    # --runs: the curves of fdfo.toy.budget's runs of that budget replace the sweep's (a run of another budget is not
    # read)
    (tmp_path / "runs" / "2d").mkdir(parents=True)
    for seed, budget_ in ((0, 200), (1, 999)):
        run_ = {"config": {"seed": seed, "evaluations": budget_}, "curve": _curve([-1.0, -0.6, -0.2], [1.0, 0.2, 0.1])}
        (tmp_path / "runs" / "2d" / f"diffusion_nft-seed{seed}.json").write_text(json.dumps(run_))
    diversity.main(["--sweep", str(tmp_path), "--settings", "2d", "--plot", str(tmp_path / "d.png"), "--runs",
                    str(tmp_path / "runs"), "--evaluations", "200"])
    out = capsys.readouterr().out
    assert "| gap fraction | diffusion_nft |" in out and "| 0.2 | 0.60 |" in out  # 1 + (0.2 / 0.4) (0.2 - 1)


def test_fdfo_velocity_is_fdfo_with_the_velocity_trust_region():
    cfg = sweep.method_config(sweep.SETTINGS["d64"], "fdfo_velocity", lr=3e-3, clip=0.1, churn=0.05, seed=2)
    assert (cfg.algorithm, cfg.trust_region, cfg.lr, cfg.clip, cfg.churn, cfg.seed, cfg.dim, cfg.prompts) == (
        "fdfo", "velocity", 3e-3, 0.1, 0.05, 2, 64, 16)
    assert sweep.method_config(sweep.SETTINGS["d64"], "fdfo", lr=1e-3).trust_region == "separation"
