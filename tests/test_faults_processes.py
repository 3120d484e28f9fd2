"""Faults around the training process: the one-run-per-folder lock, a launcher that dies, a double start, SIGTERM
and Ctrl-C in a real smoke run, a signal during a checkpoint write, kill -9 at random moments."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import checkpoints, safety
from fdfo.errors import RunError
from tests.test_faults import ROOT, env, newest
from tests.test_train import read_log

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
           "safety.watch_parent(grace_s=2, poll_s=0.05); print(\"watching\", flush=True); time.sleep(120)'], env=env); "
           "print(child.pid, flush=True); child.wait()")


def test_a_worker_ends_when_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", WATCHED], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                text=True)
    worker = int(launcher.stdout.readline())
    assert launcher.stdout.readline() == "watching\n"  # the worker watches its launcher now, however long that took
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 100  # a bound against hanging (the worker polls every 0.05 s), not a speed check
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the orphaned worker should have stopped"


def test_a_rank_whose_peer_stopped_first_ends_with_one_line(tmp_path):
    """Rank 0 refuses its settings and exits; rank 1, waiting for it in a collective, sees the closed connection
    (under torchrun, also before the launcher stops it) and ends with one line, not a traceback."""
    from tests.gloo_pair import run_pair

    (code0, _, err0), (code1, _, err1) = run_pair("tests/lost_peer_worker.py", tmp_path)
    assert (code0, [line for line in err0.splitlines() if line.startswith("error: ")]) == (
        2, ["error: rank 0 refuses its settings"])
    assert code1 == 2 and "Traceback" not in err1, err1[-3000:]
    (line,) = [line for line in err1.splitlines() if line.startswith("error: ")]
    # gloo's words depend on when the connection went: "Connection closed by peer [127.0.0.1]:P", or under load
    # "Read error [127.0.0.1]:P: Connection reset by peer"
    assert line.startswith("error: rank 1 lost the connection to another process of this run ("), line
    assert "[127.0.0.1]:" in line and "by peer" in line, line
    assert line.endswith("): another rank stopped first (its own message says why), or the network between them "
                         "failed"), line


@pytest.mark.parametrize("message, world, expected", [
    ("Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] "
     "Connection closed by peer [127.0.0.1]:27325. This is typically caused by a remote worker crashing. Check the "
     "logs of the remote worker before reporting an error. GLHF!", "2",
     "rank 1 lost the connection to another process of this run (Gloo connectFullMesh failed with Connection closed "
     "by peer [127.0.0.1]:27325.): another rank stopped first (its own message says why), or the network between "
     "them failed"),  # what a torchrun rank still joining the group printed as a traceback (issue 33)
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5", "1", None),
    ("CUDA error: out of memory", "2", None),
])
def test_lost_peer_names_only_a_lost_connection_of_a_multi_process_run(monkeypatch, message, world, expected):
    from fdfo.distributed import lost_peer

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "1")
    assert lost_peer(RuntimeError(message)) == expected
    assert lost_peer(ValueError(message)) is None


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
    """A smoke run with its output in files beside the run folder (`process.err`: the stderr file), not in pipes: a
    pipe nobody reads fills up and blocks the run in a write, where no signal can end it."""
    out = Path(f"{run}.{len(list(Path(run).parent.glob(f'{Path(run).name}.*.err')))}")
    with open(f"{out}.out", "w") as stdout, open(f"{out}.err", "w") as stderr:
        process = subprocess.Popen([sys.executable, "train.py", *SMOKE, "--run-dir", str(run), *args], cwd=ROOT,
                                   env=env(), stdout=stdout, stderr=stderr, text=True)
    process.err = Path(f"{out}.err")
    return process


def wait_for(path, process, timeout=300):  # a bound against hanging, not a speed check
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.err.read_text()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_double_start_sigterm_and_ctrl_c(tmp_path):
    """Two smoke runs side by side (SIGTERM for one, Ctrl-C for the other); a double start on the first."""
    runs = {signal.SIGTERM: tmp_path / "term", signal.SIGINT: tmp_path / "int"}
    processes = {sig: start_train(run, "--num-epochs", "100000") for sig, run in runs.items()}
    wait_for(runs[signal.SIGTERM] / "checkpoints/epoch-0000001", processes[signal.SIGTERM])
    second = subprocess.run([sys.executable, "train.py", *SMOKE, "--run-dir", str(runs[signal.SIGTERM]), "--num-epochs",
                             "100000"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another training run (pid {processes[signal.SIGTERM].pid} on host" in second.stderr

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        run, process = runs[sig], processes[sig]
        wait_for(run / "checkpoints/epoch-0000001", process)
        process.send_signal(sig)
        process.wait(timeout=300)  # a bound against hanging, not a speed check: exit 143 / 130 below
        err = process.err.read_text()
        # (not 0) shows the run stopped at the signal; 100,000 epochs, so that no run can finish first (at 40 the Ctrl-C
        # run, training while the SIGTERM one was awaited, sometimes finished before its signal came)
        assert process.returncode == code and "Traceback" not in err, err[-3000:]
        done = int(newest(run).split("-")[1])
        assert err.strip().splitlines()[-1] == (f"interrupted by {sig.name}; rerun the same command to resume from "
                                                f"epoch {done} ({run / 'checkpoints' / newest(run)})")
        for folder in (run / "checkpoints").iterdir():  # finished or discarded: no temporary folder, none torn
            assert folder.name.startswith("epoch-") and checkpoints.read_checkpoint(folder)
        safety.RunLock(run).release()  # the lock went with the process


# Runs an entry point as __main__ with an import hook that, at the first import of torch (inside the entry point's
# `guarded`, under every entry point's heavy imports), says so on stdout and then waits: the test's Ctrl-C lands there
# whatever the machine's load, never before `guarded` is entered nor after the imports are done. First it sets
# Python's own Ctrl-C handler, as Python does at start-up in a terminal: a shell starts a background job (`cmd &`
# without job control, as a CI runner may) with SIGINT ignored, the child inherits that and Python then installs none,
# so the signal would be lost. The wait is bounded: with no Ctrl-C the child says so and exits 3 instead of going on
# into the entry point (a whole smoke run), and the test ends it if even that does not come.
BLOCK_AT_TORCH = """
import runpy, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            print("importing torch", flush=True)
            time.sleep(300)
            print("no Ctrl-C came in 300 s", file=sys.stderr, flush=True)
            raise SystemExit(3)
        return None

sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["train.py", "generate.py", "metrics.py"])
def test_ctrl_c_while_the_entry_point_is_still_importing(script, tmp_path):
    """Ctrl-C while the entry point imports torch: one line, exit 130, nothing written (run from another folder)."""
    command = [sys.executable, "-c", BLOCK_AT_TORCH, str(ROOT / script), *(SMOKE if script == "train.py" else [])]
    process = subprocess.Popen(command, cwd=tmp_path, env=env() | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "importing torch\n", process.communicate()[1][-3000:]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=400)  # beyond the child's own bound of 300 s: never reached by load
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGINT")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_signal_whose_raise_is_swallowed_by_a_finalizer_still_stops_the_run(monkeypatch):
    """A signal that arrives while a weakref callback runs raises inside it, and Python only prints "Exception ignored"
    and goes on: the guard keeps the signal, and the epoch loop's `check` raises it (seen: a Ctrl-C'd smoke run that
    trained on for 978 epochs)."""
    import operator
    import weakref

    from fdfo.errors import Interrupted

    class Thing:
        pass

    unraisable = []  # what Python would print as "Exception ignored in ..." (a traceback on stderr)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    guard = safety.SignalGuard().install()
    try:
        thing = Thing()
        weakref.finalize(thing, guard._handle, signal.SIGINT, None)  # the handler runs in a finalizer, as in the GC
        del thing  # the raise is lost here
        with pytest.raises(Interrupted) as info:
            guard.check()
        assert info.value.signum == signal.SIGINT
        guard.check()  # raised once: nothing pending any more
    finally:
        guard.uninstall()
    assert unraisable == []  # the guard's hook took the lost raise: no traceback-like noise on stderr
    weakref.finalize(Thing(), operator.truediv, 1, 0)  # other lost exceptions still reach the previous hook
    assert [type(u.exc_value) for u in unraisable] == [ZeroDivisionError]


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
        process.wait()
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


def test_the_epoch_loop_acts_on_a_signal_whose_raise_was_swallowed(tmp_path, monkeypatch):
    """The training loop checks the guard at every epoch: a SIGTERM lost in a finalizer during epoch 1 ends the run
    before epoch 2, with the interrupted exit and the checkpoint of epoch 1 intact."""
    import weakref

    from fdfo import train_loop
    from fdfo.errors import Interrupted
    from tests.test_train import tiny_config

    class Thing:
        pass

    real = train_loop.run_epoch

    def epoch_then_a_lost_signal(run):
        real(run)
        if run.epoch == 1:
            thing = Thing()
            weakref.finalize(thing, run.guard._handle, signal.SIGTERM, None)
            del thing

    monkeypatch.setattr(train_loop, "run_epoch", epoch_then_a_lost_signal)
    with pytest.raises(Interrupted) as info:
        train_loop.train(tiny_config(tmp_path / "run", num_epochs=3))
    assert info.value.signum == signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["epoch-0000001"]
