"""train.py --config runs/<run>/config.json: a run's recorded settings as flags, overridable, checked like flags."""

import dataclasses
import json
from pathlib import Path

import pytest

import train
from fdfo.cli import parse_with_preset
from fdfo.config import PRESETS, Config, batch_geometry, smoke_config
from fdfo.replay import RECORDED, config_flags, expand_config
from fdfo.resume import resolved_config


def parse(argv):
    return parse_with_preset(Config, PRESETS, expand_config(argv))


def write_config(path, cfg):
    """config.json as a run writes it (train_loop.open_logger)."""
    path.write_text(json.dumps(resolved_config(cfg, batch_geometry(cfg, 1), path.parent / "that-run")))
    return path


def unusual_config():
    """Every kind of setting away from its default: bools both ways, None and not, tuples, floats, nested fields."""
    cfg = smoke_config()
    cfg.seed, cfg.num_epochs, cfg.max_batch_size, cfg.log_wandb, cfg.offload_text_encoders = 11, 3, None, True, False
    cfg.device, cfg.resume_from, cfg.run_dir = "cpu", "somewhere/checkpoints/epoch-0000002", "somewhere"
    cfg.sample.churn_schedule, cfg.sample.churn_weight, cfg.sample.guidance_scale = "interval", None, 1.5
    cfg.train.betas, cfg.train.learning_rate, cfg.train.compile = (0.5, 0.25), 1 / 3, True
    cfg.reward.specs, cfg.reward.vlm_fsdp = ("redness:1.0", "brightness:0.5"), False
    cfg.baseline.ema_decay = 0.123456789
    return cfg


@pytest.mark.parametrize("make", [unusual_config, smoke_config, Config], ids=["unusual", "smoke", "paper"])
def test_a_config_json_replays_every_setting(make, tmp_path):
    original = make()
    replayed = parse(["--config", str(write_config(tmp_path / "config.json", original))])
    # where that run lived is not taken; its prompt file is the same file, named absolutely
    expected = dataclasses.replace(original, run_dir=None, resume_from=None,
                                   prompt_file=str(Path(original.prompt_file).resolve()))
    assert dataclasses.asdict(replayed) == dataclasses.asdict(expected)


def test_flags_after_the_file_override_it_and_flags_before_it_do_not(tmp_path):
    path = str(write_config(tmp_path / "config.json", unusual_config()))
    assert parse(["--config", path, "--num-epochs", "7", "--train.no-compile"]).num_epochs == 7
    assert not parse(["--config", path, "--train.no-compile"]).train.compile
    assert parse(["--num-epochs", "7", "--config", path]).num_epochs == 3
    assert parse([f"--config={path}", "--preset", "paper"]).seed == 11  # the file's values, whatever the preset
    assert parse(["--config", path, "--run-dir", "mine"]).run_dir == "mine"


def test_unknown_keys_are_refused_in_one_message_and_recorded_values_skipped(tmp_path):
    data = json.loads(write_config(tmp_path / "config.json", smoke_config()).read_text())
    assert set(RECORDED) <= set(data)  # geometry, run_dir, resume_from: in the file, not carried over
    data |= {"nmu_epochs": 3, "zzz": None}
    data["sample"]["resoltion"] = 64
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) sample.resoltion, nmu_epochs, zzz; "):
        config_flags(tmp_path / "bad.json")


@pytest.mark.parametrize("change, fragment", [
    ({"log_wandb": "yes"}, 'log_wandb is "yes", not true or false'),
    ({"sample": [1]}, "sample is [1], not an object of SampleConfig settings"),
    ({"num_epochs": [1, 2]}, "num_epochs is [1, 2], not a whole number"),
    ({"train": {"betas": [0.9, {"a": 1}]}}, "train.betas is"),
])
def test_values_of_the_wrong_kind_are_refused(change, fragment, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(change))
    with pytest.raises(ValueError, match=f"--config {tmp_path / 'c.json'}: " + fragment.replace("[", r"\[")):
        config_flags(tmp_path / "c.json")


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"), ("{", "cannot be read as JSON"), ("[1]", "holds a JSON list"),
    ('{"num_epochs": 0, "train": {"clip_range": 0}}', "--num-epochs 0 is invalid: it must be >= 1; "
                                                      "--train.clip-range 0.0 is invalid"),
])
def test_train_py_reports_a_bad_config_in_one_line_before_creating_anything(content, fragment, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert fragment in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_value_tyro_cannot_read_names_its_flag(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"num_epochs": "ten"}))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(tmp_path / "c.json")])
    assert e.value.code == 2 and "--num-epochs" in capsys.readouterr().err


def test_config_needs_a_file():
    with pytest.raises(ValueError, match="--config needs a file"):
        expand_config(["--config", "--num-epochs", "3"])


@pytest.mark.parametrize("change, fragment", [
    ({"num_epochs": "abc"}, 'num_epochs is "abc", not a whole number (--num-epochs)'),
    ({"num_epochs": True}, "num_epochs is true, not a whole number (--num-epochs)"),
    ({"num_epochs": 2.5}, "num_epochs is 2.5, not a whole number (--num-epochs)"),
    ({"train": {"learning_rate": "fast"}}, 'train.learning_rate is "fast", not a finite number '
                                           '(--train.learning-rate)'),
    ({"train": {"betas": [0.9, 0.99, 0.999]}}, "train.betas is [0.9, 0.99, 0.999], not a list of 2 finite numbers "
                                               "(--train.betas)"),
    ({"sample": {"churn_schedule": "rare"}}, 'sample.churn_schedule is "rare", not one of "raw", "interval", "prior" '
                                             '(--sample.churn-schedule)'),
    ({"max_batch_size": "4"}, 'max_batch_size is "4", not a whole number or null (--max-batch-size)'),
    ({"reward": {"specs": ["--x"]}}, "reward.specs is [\"--x\"]: a value of --reward.specs cannot start with '-'"),
])
def test_train_py_names_the_file_and_the_key_of_a_value_of_the_wrong_type(change, fragment, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(change))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "╭" not in err, err  # no tyro box
    assert err.strip() == f"error: --config {path}: {fragment}"
    assert not (tmp_path / "run").exists()


def test_a_string_that_looks_like_a_flag_stays_a_value(tmp_path):
    cfg = unusual_config()
    cfg.run_name, cfg.prompt_file, cfg.train.learning_rate = "--no-log-wandb", "-prompts.txt", 1
    replayed = parse(["--config", str(write_config(tmp_path / "config.json", cfg))])
    assert (replayed.run_name, replayed.log_wandb) == ("--no-log-wandb", True)
    assert Path(replayed.prompt_file).name == "-prompts.txt"  # a value (resolved in the repository, as recorded)
    assert replayed.train.learning_rate == 1.0  # a whole number is a number



# ----------------------------------------------------------------------------------------------------------------------
# Portable runs: the prompt file relative to the repository


def test_the_prompt_file_is_recorded_relative_to_the_repository_and_replayed_from_this_clone(tmp_path, monkeypatch):
    import fdfo.prompts

    root = Path(train.__file__).resolve().parent
    cfg = smoke_config()
    assert Path(cfg.prompt_file).is_absolute()  # the preset finds its prompts from any working directory
    assert json.loads(write_config(tmp_path / "smoke.json", cfg).read_text())["prompt_file"] == "prompt_sets/smoke.txt"
    (tmp_path / "mine.txt").write_text("a prompt\n")
    monkeypatch.chdir(root / "prompt_sets")
    cfg.prompt_file = "smoke.txt"  # relative to a working directory inside the repository
    assert json.loads(write_config(tmp_path / "here.json", cfg).read_text())["prompt_file"] == "prompt_sets/smoke.txt"
    monkeypatch.chdir(tmp_path)
    cfg.prompt_file = "mine.txt"  # a file outside the repository: absolute
    outside = str(tmp_path.resolve() / "mine.txt")
    assert json.loads(write_config(tmp_path / "mine.json", cfg).read_text())["prompt_file"] == outside

    clone = tmp_path / "elsewhere" / "clone"  # the same files replayed by another checkout of the repository
    monkeypatch.setattr(fdfo.prompts, "REPOSITORY", clone)
    assert parse(["--config", str(tmp_path / "smoke.json")]).prompt_file == str(clone / "prompt_sets" / "smoke.txt")
    assert parse(["--config", str(tmp_path / "mine.json")]).prompt_file == outside


def test_a_run_that_recorded_its_prompt_file_absolute_still_resumes(tmp_path):
    from fdfo.resume import check_resume_settings

    cfg = smoke_config()
    cfg.run_dir = str(tmp_path / "run")
    old = json.loads(json.dumps(dataclasses.asdict(cfg)))  # an older config.json: the absolute path as given
    assert Path(old["prompt_file"]).is_absolute()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    resume = tmp_path / "run" / "checkpoints" / "epoch-0000004"
    assert check_resume_settings(cfg, batch_geometry(cfg, 1), resume) == []
    cfg.prompt_file = str(tmp_path / "other.txt")  # another file is still refused
    with pytest.raises(ValueError, match=r"--prompt-file 'prompt_sets/smoke.txt' -> '.*other.txt'"):
        check_resume_settings(cfg, batch_geometry(cfg, 1), resume)


@pytest.mark.slow  # two tiny training runs in fresh processes, about 25 s
def test_a_run_replays_from_another_clone_in_another_folder(tmp_path):
    """A smoke run in one copy of the repository, that copy moved away (as on another machine), and its config.json
    replayed by a second copy, started from a third folder: the same settings and prompts give the same rewards."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(train.__file__).resolve().parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for clone in ("a", "b"):
        for name in files:
            if (root / name).is_file():
                (tmp_path / clone / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, tmp_path / clone / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    small = ["--num-epochs", "1", "--total-pairs-per-epoch", "4", "--gradient-steps-per-epoch", "1"]

    def run(clone, *args):
        done = subprocess.run([sys.executable, str(tmp_path / clone / "train.py"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((Path(args[args.index("--run-dir") + 1]) / "log.jsonl").read_text().splitlines()[-1])

    first = run("a", "--preset", "smoke", *small, "--run-dir", str(tmp_path / "run-a"))
    recorded = json.loads((tmp_path / "run-a" / "config.json").read_text())
    assert recorded["prompt_file"] == "prompt_sets/smoke.txt"
    shutil.move(tmp_path / "a", tmp_path / "gone")  # the first checkout's files are no longer where they were
    again = run("b", "--config", str(tmp_path / "run-a" / "config.json"), "--run-dir", str(tmp_path / "run-b"))
    assert json.loads((tmp_path / "run-b" / "config.json").read_text())["prompt_file"] == "prompt_sets/smoke.txt"
    assert again["reward_mean"] == first["reward_mean"] and again["epoch"] == first["epoch"] == 0
