"""Durable file writes and disk-full reporting, shared by checkpoints, the run log, prompt downloads and evaluation.

`write_text_atomic` writes under a temporary name, fsyncs, renames into place and fsyncs the folder, so that neither a
crash nor a power cut leaves a half-written file under its final name. A full disk (ENOSPC / EDQUOT, also when a
library reports it only as text) becomes a `RunError` naming the file and the free space, instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from fdfo.errors import RunError


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when wrapped by a library that reports it as text (safetensors, torch's zip writer)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def disk_full_error(where: Path, what: str) -> RunError:
    try:
        free = f"; {shutil_free(where)} free there now"
    except OSError:
        free = ""
    return RunError(f"the disk is full: could not write {what} in {where}{free}. Free space (or move the run folder "
                    f"to a larger disk) and rerun the same command: it resumes from the newest complete checkpoint.")


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, fsync, rename, fsync the folder: readers never see a half-written file.

    A full disk raises RunError naming the file; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or an interrupt: no stray temporary file
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(path.parent, path.name) from None
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


