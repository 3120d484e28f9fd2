"""Durable file writes and disk-full reporting, shared by checkpoints, the run log, prompt downloads and evaluation.

`write_text_atomic` writes under a temporary name, fsyncs, renames into place and fsyncs the folder, so that neither a
crash nor a power cut leaves a half-written file under its final name. A full disk (ENOSPC / EDQUOT, also when a
library reports it only as text) becomes a `RunError` naming the file and the free space, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

from fdfo.errors import RunError


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when wrapped by a library that reports it as text (safetensors, torch's zip writer)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


RESUME_FIX = ("Free space (or move the run folder to a larger disk) and rerun the same command: it resumes from the "
              "newest complete checkpoint.")


def disk_full_error(where: Path, what: str, fix: str = RESUME_FIX) -> RunError:
    """The one message of a full disk: what could not be written where, the free space, and `fix` (the run's: rerun
    to resume; a side tool's: nothing was written, see fdfo/outputs.py)."""
    try:
        free = f"; {shutil_free(where)} free there now"
    except OSError:
        free = ""
    return RunError(f"the disk is full: could not write {what} in {where}{free}. {fix}")


def shutil_free(path: Path) -> str:
    import shutil

    return f"{shutil.disk_usage(nearest_existing(path)).free / 2**20:.0f} MiB"


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor (at the top, the filesystem root or `.`): where a
    file or folder at `path` would be created, for the checks that refuse an unwritable output path early."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (so a rename after it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on folders (EINVAL); the data fsync is what matters most
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, what: str | None = None, durable: bool = True, fix: str = RESUME_FIX) -> Iterator[Path]:
    """Yield a temporary name beside `path` for the caller to write (any writer: text, a PNG from matplotlib or
    PIL); when the block ends, fsync it (unless not `durable`: many files, each cheap to redo), rename it into place
    and fsync the folder: readers never see a half-written file. On any failure the temporary file is removed; a
    full disk raises RunError naming `what` (default: the file's name), the free space and `fix`, whatever library
    reported it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or an interrupt: no stray temporary file
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path.parent, what or path.name, fix) from None
        raise
    if durable:
        fsync_path(path.parent)


def make_folder(path: Path) -> None:
    """`mkdir -p`, with a full disk reported like every other write of the run."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(Path(path).parent, f"the folder {Path(path).name}") from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, fsync, rename, fsync the folder: readers never see a half-written file.

    A full disk raises RunError naming the file; the temporary file is removed."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


