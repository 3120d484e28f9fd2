"""The per-epoch diagnostics of FDFO runs (fdfo/diagnostics.py): hand values for the pure functions, the logged
numbers against an independent numpy computation over the epoch's latents and ratios, and training unchanged by them.

Quantile definition checked: linear interpolation between order statistics (torch.quantile's and numpy's default),
q(p) = v_i + (h - i)(v_{i+1} - v_i), h = p (n - 1), i = floor(h)."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fdfo import phases, train_loop
from fdfo.diagnostics import KEYS, epoch_diagnostics, pair_mean_square, ratio_deviation
from fdfo.objective import DX_EPS, pair_targets
from fdfo.plots import read_epoch_records, reward_figure, reward_series
from tests.test_train import _NaNReward, read_log, tiny_config


def test_pair_mean_square_hand_values_and_the_normaliser_of_the_targets():
    # pair 0: a = [3, 1], b = [1, 1] -> delta = [1, 0], mean 0.5; pair 1: a = [0, 2], b = [2, -2] -> [-1, 2], 2.5
    final = torch.tensor([[3.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, -2.0]])
    msq = pair_mean_square(final)
    assert msq.tolist() == [0.5, 2.5]
    # it is the normaliser m of the FD targets: dx = delta / (m + 1e-6), the same m for both branches
    _, dx = pair_targets(torch.zeros(4), final)
    delta = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 2.0], [1.0, -2.0]])
    torch.testing.assert_close(dx * (msq.repeat_interleave(2) + DX_EPS)[:, None], delta)
    with pytest.raises(ValueError, match="interleaved pairs"):
        pair_mean_square(torch.zeros(3, 2))


def test_ratio_deviation_hand_values():
    ratio = torch.tensor([1.0, 1.03, 0.94, 1.3], dtype=torch.float64, requires_grad=True)
    dev = ratio_deviation(ratio, 0.03)
    assert not dev.requires_grad and dev.dtype == torch.float32
    torch.testing.assert_close(dev, torch.tensor([0.0, 1.0, 2.0, 10.0]))


def test_epoch_diagnostics_hand_values():
    # rms 1, 2, 4, 8 (n = 4): p25 h = 0.75 -> 1 + 0.75 * 1 = 1.75; p50 h = 1.5 -> 2 + 0.5 * 2 = 3;
    # p75 h = 2.25 -> 4 + 0.25 * 4 = 5; mean(delta^2) = (1 + 4 + 16 + 64) / 4 = 21.25
    # ratio deviations sorted 0, 1, 2, 3, 10 (n = 5): p50 h = 2 -> 2; p90 h = 3.6 -> 3 + 0.6 * 7 = 7.2
    out = epoch_diagnostics(torch.tensor([16.0, 1.0, 64.0, 4.0]), torch.tensor([3.0, 0.0, 10.0, 1.0, 2.0]))
    assert list(out) == list(KEYS)
    expected = dict(branch_rms_p25=1.75, branch_rms_p50=3.0, branch_rms_p75=5.0, dx_sq_mean=21.25, ratio_dev_p50=2.0,
                    ratio_dev_p90=7.2)
    assert out == pytest.approx(expected, rel=1e-12)
    empty = epoch_diagnostics(torch.zeros(0), torch.zeros(0))
    assert all(math.isnan(v) for v in empty.values())


def _numpy_diagnostics(final: np.ndarray, ratios: np.ndarray, clip: float) -> dict:
    delta = (final[0::2] - final[1::2]) / 2
    msq = (delta.reshape(len(delta), -1) ** 2).mean(axis=1)
    rms = np.quantile(np.sqrt(msq), [0.25, 0.5, 0.75])
    dev = np.quantile(np.abs(ratios - 1) / clip, [0.5, 0.9])
    return dict(zip(KEYS, [*rms, msq.mean(), *dev]))


def _run(tmp_path, monkeypatch, name, diagnostics: bool, num_epochs=2):
    """Tiny smoke epochs; records the final latents, the ratio of every item trained and whether its pair is valid
    (a dropped pair trains with dx = 0). With diagnostics=False the run's data carries no diagnostic buffers and
    nothing is logged for them."""
    seen = {"final": [], "ratios": [], "valid": []}
    build, loss = phases.build_training_set, phases.spo_loss

    def spy_build(samples, *args):
        seen["final"].append(samples.final.clone())
        data = build(samples, *args)
        if not diagnostics:
            data.pair_msq = data.ratio_dev = data.gathered_valid = None
        return data

    def spy_loss(*args):
        out = loss(*args)
        seen["ratios"].append(out[1].detach().clone())
        seen["valid"].append(args[2].flatten(1).abs().sum(dim=1) > 0)
        return out

    monkeypatch.setattr(phases, "build_training_set", spy_build)
    monkeypatch.setattr(train_loop, "build_training_set", spy_build)
    monkeypatch.setattr(phases, "spo_loss", spy_loss)
    cfg = tiny_config(tmp_path / name, num_epochs=num_epochs)
    train_loop.train(cfg)
    return cfg, seen


def test_logged_diagnostics_match_numpy_and_leave_training_unchanged(tmp_path, monkeypatch):
    cfg, seen = _run(tmp_path, monkeypatch, "with", True)
    epochs = [r for r in read_log(tmp_path / "with") if "reward_mean" in r]  # epoch records
    per_epoch = len(seen["ratios"]) // 2  # micro-batches per epoch
    for epoch, record in enumerate(epochs):
        ratios = torch.cat(seen["ratios"][epoch * per_epoch:(epoch + 1) * per_epoch]).double().numpy()
        assert len(ratios) == 2 * cfg.total_pairs_per_epoch * cfg.sample.num_solver_steps  # every item, once
        expected = _numpy_diagnostics(seen["final"][epoch].double().numpy(), ratios, cfg.train.clip_range)
        assert {k: record[k] for k in KEYS} == pytest.approx(expected, rel=1e-5)
        assert expected["ratio_dev_p90"] > 0 and expected["branch_rms_p50"] > 0  # not trivially zero
    # the reward curve carries them
    series = reward_series(read_epoch_records(tmp_path / "with" / "log.jsonl"))
    assert series["ratio_dev"]["ratio_dev_p90"] == [r["ratio_dev_p90"] for r in epochs]
    assert series["dx_sq_mean"]["value"] == [r["dx_sq_mean"] for r in epochs]
    lines = {line.get_gid(): line for ax in reward_figure(series).axes for line in ax.get_lines()}
    assert list(lines["branch_rms_p50"].get_ydata()) == [r["branch_rms_p50"] for r in epochs]
    assert "dx_sq" not in series  # dx_sq_mean is not a reward component

    # the same training without the diagnostics: bit-identical weights after each epoch, same rewards
    _run(tmp_path, monkeypatch, "without", False)
    plain = [r for r in read_log(tmp_path / "without") if "reward_mean" in r]
    assert not any(k in r for r in plain for k in KEYS)
    assert [r["reward_mean"] for r in plain] == [r["reward_mean"] for r in epochs]
    for epoch in (1, 2):
        a = load_file(tmp_path / f"with/checkpoints/epoch-{epoch:07d}/adapter_model.safetensors")
        b = load_file(tmp_path / f"without/checkpoints/epoch-{epoch:07d}/adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dropped_pairs_are_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(train_loop, "build_reward_model", lambda cfg, device: _NaNReward([1, 4]))  # pairs 0 and 2
    cfg, seen = _run(tmp_path, monkeypatch, "run", True, num_epochs=1)
    record = [r for r in read_log(tmp_path / "run") if "reward_mean" in r][0]
    assert record["invalid_pairs"] == 2
    valid = torch.cat(seen["valid"])
    ratios = torch.cat(seen["ratios"])[valid].double().numpy()
    assert len(ratios) == 2 * 2 * cfg.sample.num_solver_steps  # the items of pairs 1 and 3
    final = seen["final"][0].double().numpy()[[2, 3, 6, 7]]
    expected = _numpy_diagnostics(final, ratios, cfg.train.clip_range)
    assert {k: record[k] for k in KEYS} == pytest.approx(expected, rel=1e-5)
