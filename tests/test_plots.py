"""The reward curve: the PNG is a real image, the lines drawn carry exactly the log's numbers (rewards, clip fraction,
diagnostics), and `python -m fdfo.plots` takes a run folder or a log and reports bad input in one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdfo.plots import heldout_series, main, read_epoch_records, reward_figure, reward_series, write_reward_curve

ROOT = Path(__file__).resolve().parents[1]


def _write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _epoch(epoch, reward, std, clipfrac, **components):
    record = dict(epoch=epoch, prompt_position=16 * (epoch + 1), reward_mean=reward, reward_std=std,
                  loss=-0.1, clipfrac=clipfrac, time_sample=1.5)
    for name, (mean, sd) in components.items():
        record[f"{name}_mean"], record[f"{name}_std"] = mean, sd
    return record


def _step(epoch, step):
    return dict(epoch=epoch, step=step, loss=0.5, policy_loss=0.4, clipfrac=0.9, kl=0.0, grad_norm=1.0, lr=1e-3)


def _lines(figure):
    return {line.get_gid(): line for ax in figure.axes for line in ax.get_lines()}


def _same(a, b):
    """Equal lists of floats, NaN equal to NaN."""
    np.testing.assert_array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


def test_curve_carries_the_logged_numbers(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        _step(0, 1), _step(0, 2),
        _epoch(0, 0.10, 0.02, 0.25, pickscore=(21.0, 0.5), vlm=(0.3, 0.1)),
        _step(1, 3), _step(1, 4),
        _epoch(1, 0.30, 0.05, 0.50, pickscore=(21.5, 0.4), vlm=(None, None)),  # a component without a value
        _epoch(2, 0.20, 0.01, 0.75, pickscore=(22.0, 0.3)),  # first try of epoch 2, superseded after a resume
        _epoch(3, 0.45, 0.04, float("nan"), pickscore=(22.7, 0.2), vlm=(0.5, 0.2)),
        _epoch(2, 0.40, 0.03, 0.125, pickscore=(22.5, 0.3)),  # epoch 2 again, vlm missing entirely
    ]
    _write_log(log, records, tail='{"epoch": 4, "rew')  # a line cut by a crash
    png = tmp_path / "curve.png"
    series = write_reward_curve(log, png)

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind

    nan = math.nan
    assert list(series) == ["reward", "pickscore", "vlm", "clipfrac"]
    expected = {
        "reward": ([0.10, 0.30, 0.40, 0.45], [0.02, 0.05, 0.03, 0.04]),
        "pickscore": ([21.0, 21.5, 22.5, 22.7], [0.5, 0.4, 0.3, 0.2]),
        "vlm": ([0.3, nan, nan, 0.5], [0.1, nan, nan, 0.2]),
    }
    lines = _lines(reward_figure(series))
    for name, (mean, std) in expected.items():
        _same(series[name]["epoch"], [0, 1, 2, 3])
        _same(series[name]["mean"], mean)
        _same(series[name]["std"], std)
        _same(lines[f"{name}_mean"].get_xdata(), [0, 1, 2, 3])
        _same(lines[f"{name}_mean"].get_ydata(), mean)
    _same(series["clipfrac"]["value"], [0.25, 0.50, 0.125, nan])
    _same(lines["clipfrac"].get_ydata(), [0.25, 0.50, 0.125, nan])
    # the shaded band spans mean - std .. mean + std
    band = [c for ax in reward_figure(series).axes for c in ax.collections if c.get_gid() == "reward_std"][0]
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.10 - 0.02) and max(ys) == pytest.approx(0.45 + 0.04)


def test_heldout_records_are_drawn_beside_the_training_reward_and_leave_it_alone(tmp_path):
    log = tmp_path / "log.jsonl"
    heldout = [dict(epoch=0, heldout_reward_mean=0.12, heldout_reward_ci95=0.01, heldout_redness_mean=0.12),
               dict(epoch=2, heldout_reward_mean=0.18, heldout_reward_ci95=0.02, heldout_redness_mean=0.18,
                    heldout_pickscore_mean=20.5)]
    _write_log(log, [heldout[0], _step(0, 1), _epoch(0, 0.10, 0.02, 0.25, redness=(0.10, 0.02)),
                     _epoch(1, 0.20, 0.03, 0.5, redness=(0.20, 0.03)), heldout[1]])
    assert [r["epoch"] for r in read_epoch_records(log)] == [0, 1]  # the held-out records are not epochs
    assert read_epoch_records(log, heldout=True) == heldout
    series = write_reward_curve(log, tmp_path / "curve.png")
    _same(series["reward"]["mean"], [0.10, 0.20])  # the training series are the epochs' own numbers
    figure = reward_figure(series, heldout=heldout_series(heldout))
    lines = _lines(figure)
    for name, values in (("reward", [0.12, 0.18]), ("redness", [0.12, 0.18])):
        _same(lines[f"heldout_{name}_mean"].get_xdata(), [0, 2])
        _same(lines[f"heldout_{name}_mean"].get_ydata(), values)
    assert "heldout_pickscore_mean" not in lines  # a metric without a training panel is not drawn
    bars = [c for c in figure.axes[0].collections if c.get_gid() == "heldout_reward_ci95"][0]
    ends = sorted((seg[0][1], seg[1][1]) for seg in bars.get_segments())  # the 95 % half-width around each mean
    assert ends == [pytest.approx((0.11, 0.13)), pytest.approx((0.16, 0.20))]


def test_one_epoch_and_replacing_an_older_png(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, [_step(0, 1), _epoch(0, 1.5, 0.0, 0.0)])
    png = tmp_path / "curve.png"
    png.write_bytes(b"old")
    series = write_reward_curve(log, png)
    with Image.open(png) as image:
        image.verify()
    assert series["reward"]["mean"] == [1.5] and series["clipfrac"]["value"] == [0.0]
    assert list(series) == ["reward", "clipfrac"]


def test_no_epoch_record_yet_writes_nothing(tmp_path):
    log = tmp_path / "log.jsonl"
    _write_log(log, [_step(0, 1)])
    assert write_reward_curve(log, tmp_path / "curve.png") == {}
    assert not (tmp_path / "curve.png").exists()
    assert read_epoch_records(log) == []


def test_series_of_plain_records():
    records = [_epoch(0, 1.0, 0.5, 0.1, redness=(0.25, 0.125)), _epoch(1, True, "x", None)]
    series = reward_series(records)
    _same(series["reward"]["mean"], [1.0, math.nan])  # a bool or a string is not a number
    _same(series["redness"]["mean"], [0.25, math.nan])
    _same(series["clipfrac"]["value"], [0.1, math.nan])


def test_diagnostic_panels_carry_the_logged_numbers():
    diag = [dict(branch_rms_p25=0.1, branch_rms_p50=0.2, branch_rms_p75=0.3, dx_sq_mean=0.05, ratio_dev_p50=0.5,
                 ratio_dev_p90=1.5),
            dict(branch_rms_p25=0.2, branch_rms_p50=0.4, branch_rms_p75=0.6, dx_sq_mean=0.2, ratio_dev_p50=0.25,
                 ratio_dev_p90=3.0),
            dict()]  # an epoch logged without them (e.g. before the diagnostics existed)
    records = [_epoch(e, 0.1 * e, 0.01, 0.0) | d for e, d in enumerate(diag)]
    series = reward_series(records)
    assert list(series) == ["reward", "clipfrac", "branch_rms", "ratio_dev", "dx_sq_mean"]  # dx_sq is no reward
    lines = _lines(reward_figure(series))
    nan = math.nan
    expected = dict(branch_rms_p25=[0.1, 0.2, nan], branch_rms_p50=[0.2, 0.4, nan], branch_rms_p75=[0.3, 0.6, nan],
                    dx_sq_mean=[0.05, 0.2, nan], ratio_dev_p50=[0.5, 0.25, nan], ratio_dev_p90=[1.5, 3.0, nan])
    for key, values in expected.items():
        _same(lines[key].get_xdata(), [0, 1, 2])
        _same(lines[key].get_ydata(), values)
    assert set(reward_series(records[2:])) == {"reward", "clipfrac"}  # no diagnostics: no extra panels


def _cli(argv, capsys):
    """(exit status, stdout, stderr) of `python -m fdfo.plots argv`, run in-process."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_accepts_a_run_folder_or_a_log(tmp_path, capsys):
    run = tmp_path / "00001-fdfo"
    run.mkdir()
    _write_log(run / "log.jsonl", [_step(0, 1), _epoch(0, 0.5, 0.1, 0.0)])
    assert _cli([str(run)], capsys) == (0, f"wrote {run / 'reward_curve.png'}\n", "")
    with Image.open(run / "reward_curve.png") as image:
        image.verify()
    assert _cli([str(run / "log.jsonl"), str(tmp_path / "other.png")], capsys)[0] == 0
    assert (tmp_path / "other.png").stat().st_size > 0


@pytest.mark.parametrize("case, message", [
    ("missing", "not found; pass a run folder of train.py or a log.jsonl file"),
    ("empty folder", "has no log.jsonl"),
    ("no epoch", "holds no epoch record yet"),
    ("binary", "holds no epoch record yet"),
    ("out is a folder", "is a folder; pass a file name"),
    ("out folder missing", "does not exist"),
    ("no argument", "the following arguments are required: run"),
    ("three arguments", "unrecognized arguments"),
    ("unknown flag", "unrecognized arguments: --bogus"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    run.mkdir()
    _write_log(run / "log.jsonl", [_epoch(0, 0.5, 0.1, 0.0)])
    (tmp_path / "empty").mkdir()
    _write_log(tmp_path / "steps.jsonl", [_step(0, 1)])
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    argv = {"missing": [str(tmp_path / "nope")], "empty folder": [str(tmp_path / "empty")],
            "no epoch": [str(tmp_path / "steps.jsonl")], "binary": [str(tmp_path / "binary.jsonl")],
            "out is a folder": [str(run), str(tmp_path / "empty")],
            "out folder missing": [str(run), str(tmp_path / "no" / "curve.png")],
            "no argument": [], "three arguments": [str(run), "a.png", "b.png"],
            "unknown flag": [str(run), "--bogus"]}[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_module_help_shows_the_module_form():
    result = subprocess.run([sys.executable, "-m", "fdfo.plots", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: python -m fdfo.plots [-h] run [out]\n")
    assert "a run folder (its log.jsonl is read) or a log.jsonl file" in result.stdout
