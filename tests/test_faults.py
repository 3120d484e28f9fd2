"""Faults in training runs: divergence, settings changed on resume, a full disk, the log after a resume, damaged
checkpoints, file details. Nothing lost, nothing silent. Bad input: test_faults_inputs.py; a double start, signals, a
dead launcher and kill -9: test_faults_processes.py."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import checkpoints, files, runlog, safety, train_loop
from fdfo.config import smoke_config
from fdfo.errors import RunError
from tests.test_train import read_log, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def epoch_records(run_dir):
    return [r for r in read_log(run_dir) if "reward_mean" in r]


def newest(run_dir):
    return checkpoints.latest_checkpoint(run_dir).name


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch tiny run (checkpoint epoch-0000001), copied by the tests that damage or resume it."""
    run = tmp_path_factory.mktemp("faults") / "run"
    train_loop.train(tiny_config(run))
    return run


def copy_run(one_epoch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    return run


# -- 1. divergence -----------------------------------------------------------------------------------------------------


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path)
    config_before = (run / "config.json").read_text()
    with pytest.raises(safety.Diverged, match=r"the loss is nan at epoch 1, optimizer step 4\. .*lower "
                                              r"--train.learning-rate"):
        train_loop.train(tiny_config(run, num_epochs=3, train=dataclass_train(learning_rate=1e8)))
    assert newest(run) == "epoch-0000001"  # the rerun resumes from the good one
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 1e8  # what was run
    assert config_before != (run / "config.json").read_text()
    steps = [r for r in read_log(run) if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # step 4 (NaN) stopped before its update and its log line


def dataclass_train(**changes):
    import dataclasses

    return dataclasses.replace(smoke_config().train, **changes)


def test_check_step_tells_divergence_from_an_fp16_overflow():
    assert safety.check_step(0.5, 3.0, scaler_enabled=False, epoch=2, step=7)
    assert not safety.check_step(0.5, float("inf"), scaler_enabled=True, epoch=2, step=7)  # the scaler skips it
    with pytest.raises(safety.Diverged, match="gradient norm is inf at epoch 2, optimizer step 7"):
        safety.check_step(0.5, float("inf"), scaler_enabled=False, epoch=2, step=7)
    with pytest.raises(safety.Diverged, match="gradient norm is nan"):
        safety.check_step(0.5, float("nan"), scaler_enabled=False, epoch=2, step=7)
    with pytest.raises(safety.Diverged, match="the loss is nan"):
        safety.check_step(float("nan"), 1.0, scaler_enabled=True, epoch=2, step=7)
    # fp16: an overflow is a skipped step while the loss scale can still shrink, a stall once it is below 1e-4
    assert not safety.check_step(0.5, float("inf"), True, epoch=2, step=7, loss_scale=lambda: 2.0**-13)
    with pytest.raises(safety.Diverged, match="stalled: the fp16 gradients overflow even at loss scale 6.10352e-05"):
        safety.check_step(0.5, float("inf"), True, epoch=2, step=7, loss_scale=lambda: 2.0**-14)


def test_an_fp16_run_whose_gradients_overflow_at_any_scale_stops(tmp_path, monkeypatch):
    """The training loop hands the grad scaler's scale to check_step: overflowing steps at a scale below 1e-4 stop
    the run instead of skipping every step. (fp16 autocast on the CPU; the overflow and the scale are forced.)"""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf")))
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: 2.0**-14)
    with pytest.raises(safety.Diverged, match="training stalled: .* at loss scale 6.10352e-05 .* optimizer step 1"):
        train_loop.train(tiny_config(tmp_path / "run", train=dataclass_train(precision="fp16")))
    assert checkpoints.latest_checkpoint(tmp_path / "run") is None


def test_a_non_finite_adapter_is_never_saved(one_epoch, tmp_path, monkeypatch):
    run = copy_run(one_epoch, tmp_path)
    real = train_loop.save

    def poison_then_save(r):
        with torch.no_grad():
            r.policy.trainable_parameters()[3].view(-1)[0] = float("inf")
        real(r)

    monkeypatch.setattr(train_loop, "save", poison_then_save)
    with pytest.raises(safety.Diverged, match=r"1 adapter tensor\(s\) hold NaN/inf after epoch 1, optimizer step 4"):
        train_loop.train(tiny_config(run, num_epochs=2))
    assert newest(run) == "epoch-0000001" and not list((run / "checkpoints").glob(".*"))


# -- 2. settings changed on resume -------------------------------------------------------------------------------------


def test_optimizer_settings_changed_on_resume_are_applied(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path)
    train = dataclass_train(learning_rate=2e-3, weight_decay=0.5, betas=(0.5, 0.6), eps=1e-6, max_grad_norm=0.25)
    captured = {}
    real = train_loop.run_epoch
    monkey = pytest.MonkeyPatch()
    monkey.setattr(train_loop, "run_epoch", lambda r: (captured.setdefault("groups", r.optimizer.param_groups),
                                                       real(r)))
    try:
        train_loop.train(tiny_config(run, num_epochs=2, train=train))
    finally:
        monkey.undo()
    group = captured["groups"][0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (2e-3, 0.5, (0.5, 0.6), 1e-6)
    out = capsys.readouterr().out
    for line in ("--train.learning-rate 0.01 -> 0.002", "--train.max-grad-norm 1.0 -> 0.25",
                 "--train.betas [0.9, 0.999] -> [0.5, 0.6]"):
        assert f"resume: {line} (applied from the next step)" in out
    assert [r["lr"] for r in read_log(run) if "policy_loss" in r] == [1e-2, 1e-2, 2e-3, 2e-3]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["learning_rate"] == 2e-3 and saved["train"]["betas"] == [0.5, 0.6]


def test_settings_that_change_the_run_are_refused_and_nothing_is_written(one_epoch, tmp_path):
    import dataclasses

    run = copy_run(one_epoch, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != safety.LOCK_FILE}
    cfg = tiny_config(run, num_epochs=2, seed=5, total_pairs_per_epoch=8)
    cfg.sample = dataclasses.replace(cfg.sample, guidance_scale=2.0)
    with pytest.raises(ValueError) as info:
        train_loop.train(cfg)
    message = str(info.value)
    assert "3 setting(s) differ" in message
    for part in ("--seed 1 -> 5", "--total-pairs-per-epoch 4 -> 8", "--sample.guidance-scale 1.0 -> 2.0",
                 "pass a new --run-dir"):
        assert part in message
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != safety.LOCK_FILE}
    assert after == before  # config.json, log and checkpoints untouched


def test_a_checkpoint_of_another_lora_rank_is_refused(one_epoch, tmp_path):
    resume = one_epoch / "checkpoints/epoch-0000001"
    with pytest.raises(ValueError, match=r"does not fit: --lora-rank 4 \(the checkpoint has 8\)"):
        train_loop.train(tiny_config(tmp_path / "new", num_epochs=2, lora_rank=4, resume_from=str(resume)))
    assert not (tmp_path / "new").exists()


# -- 4. disk full ------------------------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint(one_epoch, tmp_path, monkeypatch):
    run = copy_run(one_epoch, tmp_path)
    real_open = open

    class HalfWriter:
        """Writes half of the training state, then the disk is full."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWriter(f) if str(path).endswith("training_state.pt") and "w" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(RunError, match=r"the disk is full: could not write checkpoint epoch-0000002 in .*checkpoints"):
        train_loop.train(tiny_config(run, num_epochs=2))
    assert newest(run) == "epoch-0000001" and not list((run / "checkpoints").glob(".*"))  # no half temp folder
    monkeypatch.undo()
    train_loop.train(tiny_config(run, num_epochs=2))  # space again: the rerun redoes epoch 1 without duplicates
    assert [r["epoch"] for r in epoch_records(run)] == [0, 1]


def test_safetensors_disk_full_text_is_recognised():
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                            "message: \"No space left on device\" })"))
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_while_logging_leaves_no_torn_line(tmp_path, monkeypatch):
    logger = runlog.RunLogger(tmp_path, {})
    logger.log({"epoch": 0, "loss": 1.5})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data)[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog.os, "write", half_then_full)
    with pytest.raises(RunError, match=f"the disk is full: could not write log.jsonl in {tmp_path}"):
        logger.log({"epoch": 1, "loss": 2.5})
    monkeypatch.undo()
    logger.close()
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 0, "loss": 1.5}\n'


def test_a_torn_last_line_and_redone_epochs_are_dropped_on_resume(tmp_path):
    lines = ['{"epoch": 0, "step": 1}\n', '{"note": "no epoch"}\n', '{"epoch": 1, "step": 2}\n',
             '{"epoch": 2, "step": 3}\n', '{"epoch": 2, "rew']
    (tmp_path / "log.jsonl").write_text("".join(lines))
    runlog.repair_log(tmp_path / "log.jsonl", first_redone_epoch=2)
    assert (tmp_path / "log.jsonl").read_text() == "".join(lines[:3])
    runlog.repair_log(tmp_path / "log.jsonl", first_redone_epoch=5)  # nothing to drop: untouched
    assert (tmp_path / "log.jsonl").read_text() == "".join(lines[:3])


def test_what_a_killed_run_left_half_done_is_cleaned_up(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / ".epoch-0000003.tmp-123").mkdir(parents=True)  # killed while writing epoch 3
    (folder / ".epoch-0000002.old-77").mkdir()  # killed between the two renames of a re-save of epoch 2
    (folder / ".epoch-0000002.old-77/state.json").write_text("{}")
    (folder / "epoch-0000001").mkdir()
    (folder / ".epoch-0000001.old-78").mkdir()  # killed after both renames, before the old copy was deleted
    (tmp_path / ".config.json.tmp-5").write_text("{")
    checkpoints.clean_stale_files(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "epoch-0000001", "epoch-0000002",
                                                            "state.json"]
    assert (folder / "epoch-0000002/state.json").read_text() == "{}"


# -- 7. log after a resume ---------------------------------------------------------------------------------------------


def test_log_after_resume_reads_like_an_uninterrupted_run(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path)
    with open(run / "log.jsonl", "a") as f:  # a run killed during epoch 1, after some of its records
        f.write('{"epoch": 1, "step": 3, "loss": 9.0}\n{"epoch": 1, "ste')
    train_loop.train(tiny_config(run, num_epochs=2))
    train_loop.train(tiny_config(tmp_path / "straight", num_epochs=2))
    drop = ("time_sample", "time_train", "time_total", "time_heldout")
    resumed, straight = ([{k: v for k, v in r.items() if k not in drop} for r in read_log(p)]
                         for p in (run, tmp_path / "straight"))
    assert resumed == straight and [r["step"] for r in resumed if "policy_loss" in r] == [1, 2, 3, 4]


# -- 8. damaged checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: (c / "state.json").write_text("[1, 2]"), "state.json holds a list, not an object"),
    (lambda c: _edit_state(c, epoch="1"), "state.json 'epoch' is '1', not a count >= 0"),
    (lambda c: _edit_state(c, global_step=2.0), "state.json 'global_step' is 2.0, not a count >= 0"),
    (lambda c: _truncate(c / "adapter_model.safetensors"), "the file was modified or truncated"),
    (lambda c: _flip_bit(c / "adapter_model.safetensors"), "the file was modified or truncated"),
    (lambda c: (c / "adapter_config.json").write_text("{"), "adapter_config.json: JSONDecodeError"),
])
def test_damaged_checkpoints_are_clear_errors(one_epoch, tmp_path, damage, fragment):
    run = copy_run(one_epoch, tmp_path)
    damage(run / "checkpoints/epoch-0000001")
    with pytest.raises(ValueError) as info:
        train_loop.train(tiny_config(run, num_epochs=2))
    assert fragment in str(info.value) and "is damaged" in str(info.value)
    assert "Delete it to resume from the previous checkpoint" in str(info.value)


def _edit_state(folder, **changes):
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(state | changes))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # a weight's payload byte, not the header: safetensors itself cannot tell
    path.write_bytes(bytes(data))
    load_file(path)  # still a readable file


# -- 9. file details ---------------------------------------------------------------------------------------------------


def test_checkpoint_files_share_the_umask_permissions_and_hash(one_epoch):
    folder = one_epoch / "checkpoints/epoch-0000001"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    state = json.loads((folder / "state.json").read_text())
    assert state["adapter_sha256"] == checkpoints.sha256_file(folder / "adapter_model.safetensors")


def test_wandb_run_id_is_random_and_kept_by_the_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = runlog.wandb_run_id(tmp_path / "a")
    assert runlog.wandb_run_id(tmp_path / "a") == first != runlog.wandb_run_id(tmp_path / "b")
    assert len(first) == 16 and first != "a"
