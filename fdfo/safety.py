"""Run-folder safety in one place: the one-run-per-folder lock, Ctrl-C / SIGTERM handling, the divergence (NaN)
guard and the torchrun parent-death watch (durable writes and disk-full reporting: fdfo/files.py). The training loop
calls these; the entry point (fdfo/cli.py) turns `Interrupted` and `RunError` (fdfo/errors.py) into one line and an
exit status.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fdfo.errors import Interrupted, RunError
from fdfo.files import disk_full_error, is_disk_full

LOCK_FILE = ".lock"
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# -- one run per folder ------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive `fcntl.flock` on `run_dir/.lock`, held for the whole run by rank 0.

    The kernel drops a flock when its holder exits in any way, kill -9 included, so a stale lock never needs cleaning
    up by hand; the file's text (pid, host, start time) only serves the error message. NFS caveat: flock on NFS is
    emulated with POSIX byte-range locks (Linux >= 2.6.12) and is only as reliable as the server's lock manager; two
    hosts sharing a run folder on a filesystem without working locks (some NFSv3 setups, nolock mounts) are not
    protected.
    """

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise run_folder_error(run_dir, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            raise RunError(f"--run-dir {run_dir} is in use by another training run ({holder}). Wait for it to end "
                           f"or stop it; a second run on the same folder would corrupt its checkpoints and log. "
                           f"Pass another --run-dir to start a separate run.") from None
        since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock; the file stays (harmless, reused)
            self.fd = None


# -- the run folder ----------------------------------------------------------------------------------------------------

# What a run writes into its folder (wandb/ with --log-wandb); hidden temporary files: a killed write's leftovers
RUN_ENTRIES = frozenset({"config.json", "log.jsonl", "checkpoints", "images", "reward_curve.png", LOCK_FILE,
                         "wandb_id.txt", "wandb", "best.json", "compile-cache.bin"})
RUNS_ROOT = "runs"  # where runs without --run-dir go
TEMPORARY_RE = re.compile(r"^\..+\.tmp(-\d+)?$")


def check_run_folder(flag: str, path: Path, existing: Path, own_folder: bool) -> None:
    """Before anything is created: a --run-dir that exists holds nothing but a run's files (not, say, the current
    directory of an unset variable), and a folder can really be made where the run goes (permissions, read-only
    mounts and quotas that os.access does not see). `existing`: `path` or its nearest existing ancestor."""
    if own_folder and path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_ENTRIES and not TEMPORARY_RE.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"{flag} {path} is a folder holding files that are not a run's ({shown}); pass a new or "
                             f"empty folder, or an earlier run's folder to resume it")
    try:
        probe = tempfile.mkdtemp(prefix=".fdfo-probe-", dir=path if path.is_dir() else existing)
        os.rmdir(probe)
    except OSError as e:
        raise run_folder_error(path, e) from None


def run_folder_error(path: str | Path, e: OSError) -> RunError:
    """One line for a run folder that cannot be made (EACCES, EPERM, EROFS, a full disk or quota)."""
    if is_disk_full(e):
        return disk_full_error(Path(path), "the run folder")
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    return RunError(f"cannot create the run folder {path}: {e.strerror or e}{f' ({code})' if code else ''}. Pass a "
                    f"--run-dir in a folder you can write to, on a disk with free space and quota.")


def check_run_location(cfg) -> None:
    """--run-dir (or the runs/ root) must be a new folder, an earlier run's, or creatable in a writable one; checked
    before anything is made (check_run_folder: not empty, no foreign files, a folder can really be made)."""
    flag, path = ("--run-dir", Path(cfg.run_dir)) if cfg.run_dir is not None else ("the runs root", Path(RUNS_ROOT))
    if cfg.run_dir is not None and not cfg.run_dir.strip():
        raise ValueError(f"--run-dir {cfg.run_dir!r} is empty (an unset variable in a job script?); pass a folder "
                         f"path, or leave --run-dir out for a new {RUNS_ROOT}/<id>-{cfg.run_name}/")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; pass a folder path (new or an earlier run's)")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable; pass a --run-dir in a folder you can write to")
    check_run_folder(flag, path, existing, own_folder=cfg.run_dir is not None)


def prepare_run_dir(cfg, locks: list) -> Path:
    """Rank 0 creates (or reuses, for --run-dir) the run folder, locks it, and tells the other ranks where it is."""
    from fdfo import distributed as dist
    from fdfo.checkpoints import clean_stale_files, new_run_dir

    path = None
    if dist.get_rank() == 0:
        try:
            if cfg.run_dir is not None:
                path = Path(cfg.run_dir)
                path.mkdir(parents=True, exist_ok=True)
            else:
                path = new_run_dir(RUNS_ROOT, cfg.run_name)
        except OSError as e:  # checked up front (check_run_location); this is a change since, e.g. a full quota
            raise run_folder_error(cfg.run_dir or RUNS_ROOT, e) from None
        if not locks:
            locks.append(RunLock(path))
        clean_stale_files(path)
    return Path(dist.broadcast_object(str(path) if path else None))


# -- signals -----------------------------------------------------------------------------------------------------------


class SignalGuard:
    """SIGINT / SIGTERM raise `Interrupted` in the main thread, except inside `critical()` (a checkpoint or config
    being written), where the signal is held back until the block ends: a checkpoint is finished, never torn."""

    def __init__(self):
        self.deferring = 0
        self.pending: int | None = None
        self.previous = {}
        self.previous_hook = None

    def install(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in INTERRUPT_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
            self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if self.previous_hook is not None:
            sys.unraisablehook, self.previous_hook = self.previous_hook, None

    def _unraisable(self, unraisable) -> None:
        """A raise of `_handle` that Python could not deliver (inside a finalizer): no "Exception ignored" traceback
        on stderr, since the signal is kept for `check`; anything else goes to the previous hook."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self.previous_hook(unraisable)

    def _handle(self, signum, frame) -> None:
        # Recorded before raising: a signal that lands while a weakref callback or __del__ runs (during garbage
        # collection) raises there, and Python prints "Exception ignored in ..." and goes on; `check` then still sees
        # it (a smoke run was seen training on for 978 epochs after its Ctrl-C).
        self.pending = signum
        if not self.deferring:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise `Interrupted` for a signal whose raise was swallowed (see `_handle`); the training loop calls this at
        every epoch."""
        if self.pending is not None and not self.deferring:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
            if not self.deferring and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


def watch_parent(grace_s: float = 15.0, poll_s: float = 1.0) -> None:
    """Under torchrun, end this worker when the launcher dies (e.g. kill -9 of torchrun) instead of training on as an
    orphan: a daemon thread polls getppid() (portable, unlike prctl(PR_SET_PDEATHSIG), which also fires when the
    launcher's spawning *thread* ends). On parent death it sends ourselves SIGTERM (the normal interrupted exit) and,
    if the main thread is stuck in a collective that never returns, exits hard after `grace_s`."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"error: the torchrun launcher (pid {parent}) is gone; stopping this worker", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="fdfo-parent-watch", daemon=True).start()


# -- divergence --------------------------------------------------------------------------------------------------------

# fp16 loss scale below which an overflow means the gradients are inf without scaling (the scaler starts at 2**16
# and halves per overflow: from 2**16 to below 1e-4 takes 30 overflows in a row); fairseq uses the same floor
MIN_LOSS_SCALE = 1e-4
DIVERGED_FIX = "lower --train.learning-rate (or --train.max-grad-norm) and check that the reward is finite and bounded"


class Diverged(RunError):
    """Training produced a non-finite loss, gradient or adapter weight; the last good checkpoint stays the newest."""


def check_step(loss: float, grad_norm: float, scaler_enabled: bool, epoch: int, step: int,
               loss_scale: Callable[[], float] | None = None) -> bool:
    """Called every optimizer step before the update. Returns False for a step the fp16 grad scaler will skip.

    A non-finite loss is divergence. A non-finite gradient norm is divergence too, except with the fp16 grad scaler:
    there an overflowing scaled gradient is routine (the scaler skips the step and halves its scale), until the
    scale (`loss_scale()`, read only on an overflow) has fallen below MIN_LOSS_SCALE: then the gradients overflow
    without any scaling and every later step would be skipped too, a run that goes on without learning.
    """
    if not math.isfinite(loss):
        raise Diverged(f"training diverged: the loss is {loss} at epoch {epoch}, optimizer step {step}. Nothing was "
                       f"saved from this epoch; {DIVERGED_FIX}, then rerun (it resumes from the last good checkpoint).")
    if not math.isfinite(grad_norm):
        if scaler_enabled:
            scale = loss_scale() if loss_scale is not None else None
            if scale is None or scale >= MIN_LOSS_SCALE:
                return False
            raise Diverged(f"training stalled: the fp16 gradients overflow even at loss scale {scale:g} (epoch "
                           f"{epoch}, optimizer step {step}); every step is being skipped. Nothing was saved from this "
                           f"epoch; {DIVERGED_FIX}, or train with --train.precision bf16, then rerun.")
        raise Diverged(f"training diverged: the gradient norm is {grad_norm} at epoch {epoch}, optimizer step {step}. "
                       f"Nothing was saved from this epoch; {DIVERGED_FIX}, then rerun (it resumes from the last good "
                       f"checkpoint).")
    return True


def check_weights(tensors: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    """Before every save: refuse to write an adapter with a NaN / inf entry."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise Diverged(f"training diverged: {len(bad)} adapter tensor(s) hold NaN/inf after epoch {epoch}, optimizer "
                       f"step {step} (e.g. {bad[0]}); the checkpoint was not written; {DIVERGED_FIX}, then rerun "
                       f"(it resumes from the last good checkpoint).")


