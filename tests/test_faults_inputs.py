"""Bad input to training is refused before anything is created: check_config names the flag and the allowed range,
the entry point turns it into one `error:` line, devices and unwritable run folders are checked up front."""

import os
from pathlib import Path

import pytest
import torch

from fdfo import train_loop
from fdfo.config import check_config, smoke_config
from tests.test_train import tiny_config

# -- 3. input checks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, fragment", [
    (dict(num_epochs=0), "--num-epochs 0 is invalid: it must be >= 1"),
    (dict(save_freq=-1), "--save-freq -1 is invalid: it must be >= 1"),
    (dict(gradient_steps_per_epoch=0), "--gradient-steps-per-epoch 0 is invalid"),
    (dict(max_batch_size=0), "--max-batch-size 0 is invalid"),
    (dict(image_log_freq=-1), "--image-log-freq -1 is invalid: it must be >= 0"),
    (dict(lora_rank=0), "--lora-rank 0 is invalid: it must be >= 1"),
    (dict(lora_alpha=0.0), "--lora-alpha 0.0 is invalid: it must be > 0"),
    (dict(sample=dict(num_solver_steps=0)), "--sample.num-solver-steps 0 is invalid"),
    (dict(sample=dict(resolution=0)), "--sample.resolution 0 is invalid"),
    (dict(sample=dict(churn_weight=-0.1)), "--sample.churn-weight -0.1 is invalid: it must be >= 0"),
    (dict(sample=dict(batch_size=0)), "--sample.batch-size 0 is invalid"),
    (dict(sample=dict(decode_batch_size=0)), "--sample.decode-batch-size 0 is invalid"),
    (dict(train=dict(batch_size=0)), "--train.batch-size 0 is invalid"),
    (dict(train=dict(clip_range=0.0)), "--train.clip-range 0.0 is invalid: it must be > 0"),
    (dict(train=dict(max_grad_norm=-1.0)), "--train.max-grad-norm -1.0 is invalid: it must be >= 0"),
    (dict(train=dict(kl_weight=-1.0)), "--train.kl-weight -1.0 is invalid: it must be >= 0"),
    (dict(train=dict(learning_rate=0.0)), "--train.learning-rate 0.0 is invalid: it must be > 0"),
    (dict(train=dict(learning_rate=float("nan"))), "--train.learning-rate nan is invalid"),
    (dict(train=dict(betas=(0.9, 1.0))), "--train.betas 0.9 1.0 is invalid: it must be two numbers in [0, 1)"),
    (dict(train=dict(betas=(-0.1, 0.5))), "--train.betas -0.1 0.5 is invalid"),
    (dict(train=dict(eps=0.0)), "--train.eps 0.0 is invalid: it must be > 0"),
])
def test_check_config_names_the_flag_and_the_range(change, fragment):
    import dataclasses

    cfg = smoke_config()
    for key, value in change.items():
        if isinstance(value, dict):
            setattr(cfg, key, dataclasses.replace(getattr(cfg, key), **value))
        else:
            setattr(cfg, key, value)
    with pytest.raises(ValueError) as info:
        check_config(cfg)
    assert fragment in str(info.value) and str(info.value).count("is invalid") == 1


def test_check_config_lists_every_problem_and_passes_the_presets():
    from fdfo.config import PRESETS

    for preset in PRESETS.values():
        check_config(preset())
    cfg = smoke_config()
    cfg.num_epochs, cfg.lora_rank = 0, 0
    with pytest.raises(ValueError, match="--num-epochs 0 is invalid.*; --lora-rank 0 is invalid"):
        check_config(cfg)


def main_error(capsys, *argv):
    import train

    with pytest.raises(SystemExit) as info:
        train.main(["--preset", "smoke", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_flags_through_the_entry_point_create_nothing(capsys, tmp_path):
    run = tmp_path / "run"
    assert "--train.clip-range 0.0 is invalid" in main_error(capsys, "--train.clip-range", "0", "--run-dir", str(run))
    assert "--device 'tpu'" in main_error(capsys, "--device", "tpu", "--run-dir", str(run))
    assert "--device 'bogus:x' is not a device" in main_error(capsys, "--device", "bogus:x", "--run-dir", str(run))
    if not torch.cuda.is_available():
        assert "CUDA is not available" in main_error(capsys, "--device", "cuda:0", "--run-dir", str(run))
    (tmp_path / "file").write_text("x")
    assert "--run-dir" in main_error(capsys, "--run-dir", str(tmp_path / "file"))
    assert "is a file" in main_error(capsys, "--run-dir", str(tmp_path / "file/sub"))
    assert not run.exists()


def test_check_device_counts_cuda_devices(monkeypatch):
    from fdfo.cli import check_device

    check_device("--device", None)
    check_device("--device", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("--device", "cuda:1")
    check_device("--device", "cuda")
    with pytest.raises(ValueError, match=r"--eval-device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to "
                                         r"cuda:1"):
        check_device("--eval-device", "cuda:2")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_runs_root_is_refused(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    try:
        assert "is not writable" in main_error(capsys, "--run-dir", str(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_an_unwritable_runs_root_is_refused_also_for_root(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match=f"--run-dir {tmp_path}/run: {tmp_path} is not writable"):
        train_loop.check_run_location(tiny_config(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"the runs root runs: {tmp_path} is not writable"):
        train_loop.check_run_location(dataclasses.replace(tiny_config(tmp_path), run_dir=None))
