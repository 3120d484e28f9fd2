"""Faults and bad input in training: divergence, settings changed on resume, damaged checkpoints, a full disk, a
double start, signals, a dead launcher, kill -9 at random moments. Nothing lost, nothing silent."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import checkpoints, files, runlog, safety, train_loop
from fdfo.config import check_config, smoke_config
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
    drop = ("time_sample", "time_train", "time_total")
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


# -- 5. one run per folder, and the launcher's death -------------------------------------------------------------------

HOLD = ("import sys, time; from fdfo.safety import RunLock; RunLock(sys.argv[1]); print('held', flush=True); "
        "time.sleep(60)")


def test_the_lock_names_its_holder_and_frees_itself_under_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"is in use by another training run \\(pid {holder.pid} on host .* since "
                                           f"20..-..-.. ..:..:.. UTC\\)"):
            safety.RunLock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    safety.RunLock(tmp_path).release()


WATCHED = ("import os, sys, subprocess; env = dict(os.environ, LOCAL_RANK='0'); "
           "child = subprocess.Popen([sys.executable, '-c', 'from fdfo import safety; import time, signal; "
           "safety.watch_parent(grace_s=2, poll_s=0.05); time.sleep(60)'], env=env); "
           "print(child.pid, flush=True); child.wait()")


def test_a_worker_ends_when_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", WATCHED], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                text=True)
    worker = int(launcher.stdout.readline())
    time.sleep(3)  # the worker imports torch and starts watching
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 15
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the orphaned worker should have stopped"


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its reaper is gone with the launcher)


# -- 5, 6. double start and signals in a real smoke run ----------------------------------------------------------------

SMOKE = ["--preset", "smoke", "--total-pairs-per-epoch", "4", "--sample.num-solver-steps", "3",
         "--image-log-freq", "0", "--save-freq", "1"]


def start_train(run, *args):
    return subprocess.Popen([sys.executable, "train.py", *SMOKE, "--run-dir", str(run), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_double_start_sigterm_and_ctrl_c(tmp_path):
    """Two smoke runs side by side (SIGTERM for one, Ctrl-C for the other); a double start on the first."""
    runs = {signal.SIGTERM: tmp_path / "term", signal.SIGINT: tmp_path / "int"}
    processes = {sig: start_train(run, "--num-epochs", "40") for sig, run in runs.items()}
    wait_for(runs[signal.SIGTERM] / "checkpoints/epoch-0000001", processes[signal.SIGTERM])
    second = subprocess.run([sys.executable, "train.py", *SMOKE, "--run-dir", str(runs[signal.SIGTERM]),
                             "--num-epochs", "40"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another training run (pid {processes[signal.SIGTERM].pid} on host" in second.stderr

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        run, process = runs[sig], processes[sig]
        wait_for(run / "checkpoints/epoch-0000001", process)
        process.send_signal(sig)
        start = time.time()
        _, err = process.communicate(timeout=30)
        assert time.time() - start < 10
        assert process.returncode == code and "Traceback" not in err, err[-3000:]
        done = int(newest(run).split("-")[1])
        assert err.strip().splitlines()[-1] == (f"interrupted by {sig.name}; rerun the same command to resume from "
                                                f"epoch {done} ({run / 'checkpoints' / newest(run)})")
        for folder in (run / "checkpoints").iterdir():  # finished or discarded: no temporary folder, none torn
            assert folder.name.startswith("epoch-") and checkpoints.read_checkpoint(folder)
        safety.RunLock(run).release()  # the lock went with the process


def test_a_signal_during_a_checkpoint_write_waits_for_the_write():
    from fdfo.errors import Interrupted

    guard = safety.SignalGuard().install()
    try:
        finished = []
        with pytest.raises(Interrupted) as info:
            with guard.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now (between bytecodes): it must not raise here
                finished.append(True)
        assert finished == [True] and info.value.signum == signal.SIGTERM and info.value.exit_code == 143
        with pytest.raises(Interrupted):  # outside a critical block the signal interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        guard.uninstall()


# -- 10. kill -9 soak --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_matches_an_uninterrupted_run(tmp_path):
    args = ["--num-epochs", "6"]
    straight = subprocess.run([sys.executable, "train.py", *SMOKE, "--run-dir", str(tmp_path / "straight"), *args],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run, rng, killed_at = tmp_path / "run", random.Random(0), []
    log = run / "log.jsonl"
    for round in range(5):
        process = start_train(run, *args)
        if round:  # the first kill lands during start-up; the others once this round has logged, at random moments
            size = log.stat().st_size if log.exists() else 0
            while process.poll() is None and (log.stat().st_size if log.exists() else 0) <= size:
                time.sleep(0.02)
        time.sleep(rng.uniform(0, 2))
        if process.poll() is not None:
            break
        process.kill()
        process.communicate()
        found = checkpoints.latest_checkpoint(run)
        killed_at.append(found.name if found else None)
    assert len(killed_at) >= 3 and any(killed_at), killed_at  # killed several times, also after a checkpoint
    final = subprocess.run([sys.executable, "train.py", *SMOKE, "--run-dir", str(run), *args], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    a = load_file(tmp_path / "straight/checkpoints/epoch-0000006/adapter_model.safetensors")
    b = load_file(run / "checkpoints/epoch-0000006/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time_sample", "time_train", "time_total")
    clean = [[{k: v for k, v in r.items() if k not in drop} for r in read_log(p)] for p in (tmp_path / "straight", run)]
    assert clean[0] == clean[1]
