"""train.py as a user runs it: the smoke preset end to end, and bad input giving one clear line and exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_preset():
    assert_user_error(run_train("--preset", "bogus"), "unknown preset 'bogus'", "paper, smoke")


def test_missing_prompt_file_says_how_to_get_it(tmp_path):
    result = run_train("--prompt-file", str(tmp_path / "pickscore_train.txt"), "--run-dir", str(tmp_path / "run"))
    assert_user_error(result, "pickscore_train.txt not found", "25,432 lines", "--prompt-file")
    assert not (tmp_path / "run").exists()  # nothing created before the input was checked


def test_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert_user_error(run_train("--preset", "smoke", "--prompt-file", str(tmp_path / "empty.txt")),
                      "holds no prompts")


def test_impossible_batch_geometry_shows_the_numbers(tmp_path):
    result = run_train("--preset", "smoke", "--total-pairs-per-epoch", "16", "--train.batch-size", "5",
                       "--run-dir", str(tmp_path / "run"))
    assert_user_error(result, "--train.batch-size 5 must divide the 16 items per step",
                      "valid values: [1, 2, 4, 8, 16]")
    assert not (tmp_path / "run").exists()


def test_out_of_range_flags_are_listed_before_anything_is_created(tmp_path):
    result = run_train("--preset", "smoke", "--num-epochs", "0", "--train.clip-range", "0", "--train.betas", "0.9", "1",
                       "--run-dir", str(tmp_path / "run"))
    assert_user_error(result, "--num-epochs 0 is invalid: it must be >= 1",
                      "--train.clip-range 0.0 is invalid: it must be > 0",
                      "--train.betas 0.9 1.0 is invalid: it must be two numbers in [0, 1)")
    assert not (tmp_path / "run").exists()


def test_help_documents_the_paper_flags():
    result = run_train("--help")
    assert result.returncode == 0
    for flag in ("--num-epochs", "--total-pairs-per-epoch", "--sample.num-solver-steps", "--train.clip-range",
                 "--reward-preset", "--resume-from", "--lora-rank", "--log-wandb", "--preset"):
        assert flag in result.stdout, flag


def test_smoke_preset_improves_the_reward(tmp_path):
    result = run_train("--preset", "smoke", "--run-dir", str(tmp_path / "run"), timeout=1200)  # hang bound, not speed
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "reward_mean" in r]
    config = json.loads((run / "config.json").read_text())
    assert len(epochs) == config["num_epochs"]
    first, last = epochs[0], epochs[-1]
    # The margin is several standard errors of an epoch mean (std / sqrt(samples per epoch)), so it is not noise.
    stderr = max(first["reward_std"], last["reward_std"]) / (2 * config["total_pairs_per_epoch"]) ** 0.5
    assert last["reward_mean"] - first["reward_mean"] > 4 * stderr, (first, last)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints[-1] == f"epoch-{config['num_epochs']:07d}"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt", "state.json"} <= {
        p.name for p in (run / "checkpoints" / checkpoints[-1]).iterdir()}
    assert sorted((run / "images").glob("epoch-0000000-pair-*.png"))
    # The preset's held-out evaluation (the run's only one as a user starts it): every 4 epochs on its 16 prompts, the
    # best evaluated checkpoint in best.json (what the records hold is checked in tests/test_heldout.py).
    heldout = [r for r in records if "heldout_reward_mean" in r]
    assert [(r["epoch"], r["heldout_num_prompts"]) for r in heldout] == [(e, 16) for e in (0, 4, 8, 12, 16)]
    best = max(heldout[1:], key=lambda r: r["heldout_reward_mean"])
    assert json.loads((run / "best.json").read_text())["checkpoint"] == f"checkpoints/epoch-{best['epoch']:07d}"
    # The progress picture is redrawn every epoch from the log (its content is checked in tests/test_plots.py).
    with Image.open(run / "reward_curve.png") as picture:
        assert picture.format == "PNG" and picture.width > 100


@pytest.mark.parametrize("argv, flag, value, pair", [
    (["--log-wandb", "maybe"], "--log-wandb", "maybe", "--log-wandb / --no-log-wandb"),
    (["--seed", "3", "--train.compile=yes"], "--train.compile", "yes", "--train.compile / --train.no-compile"),
    (["--no-offload-text-encoders", "0"], "--no-offload-text-encoders", "0",
     "--offload-text-encoders / --no-offload-text-encoders"),
])
def test_an_on_off_switch_given_a_value_is_named_in_one_line(capsys, argv, flag, value, pair):
    """tyro alone answers "Unrecognized options: maybe", naming neither the flag nor the fix."""
    from fdfo.cli import parse_with_preset
    from fdfo.config import PRESETS, Config

    with pytest.raises(SystemExit) as exit_info:
        parse_with_preset(Config, PRESETS, ["--preset", "smoke", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {flag} {value!r}: {flag} is an on/off switch and takes no value; write {pair} alone"]


def test_on_off_switches_without_a_value_still_parse():
    from fdfo.cli import parse_with_preset
    from fdfo.config import PRESETS, Config

    cfg = parse_with_preset(Config, PRESETS, ["--preset", "smoke", "--log-wandb", "--train.compile", "--seed", "4",
                                              "--no-offload-text-encoders"])
    assert (cfg.log_wandb, cfg.train.compile, cfg.seed, cfg.offload_text_encoders) == (True, True, 4, False)
