"""Output paths of the side tools (fdfo.export, fdfo.bench, fdfo.toy, fdfo.prompts download): checked before any
work, and written whole or not at all.

`check_output_path` refuses, before anything is loaded or measured, an output that cannot be written: an empty path
(an unset variable in a job script), a folder where a file is wanted or the reverse, a path below a file, or a
nearest existing folder without write permission. `replace_file` moves a finished temporary file over its final
name, so that a reader (or a crash) never sees a half-written output, and reports a full disk in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from fdfo.errors import RunError
from fdfo.files import atomic_path, disk_full_error, fsync_path, nearest_existing


def check_output_path(flag: str, path: str | Path, folder: bool) -> Path:
    """`path` as a Path if an output can be written there (`folder`: a folder is wanted, else a file); ValueError
    naming `flag` otherwise. Writing a file means creating a temporary one beside it and renaming it: the folder that
    holds it must be writable, the file itself need not be."""
    if str(path) == "":
        raise ValueError(f"{flag} is empty; give a {'folder' if folder else 'file'} path")
    path = Path(path)
    kind = "a folder" if folder else "a file"
    if path.exists():
        if path.is_dir() != folder:
            raise ValueError(f"{flag} {str(path)!r} is {'a file' if folder else 'a folder'}; give {kind} path")
        holder = path if folder else path.absolute().parent
        if not os.access(holder, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {str(path)!r}: the folder {str(holder)!r} is not writable")
        return path
    parent = nearest_existing(path.absolute().parent)
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be created: the folder {str(parent)!r} is not writable")
    return path


REDO_FIX = "Nothing was written: free space, or choose another output path, and rerun."


def disk_full(path: Path) -> RunError:
    return disk_full_error(path.parent, path.name, REDO_FIX)


def write_text(path: str | Path, text: str) -> bool:
    """Write `text` to `path` whole (fdfo.files.atomic_path: temporary file, fsync, rename); True if it replaced an
    existing file. A full disk is a RunError naming the file, and leaves neither the temporary file nor a changed
    `path`."""
    path = Path(path)
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fix=REDO_FIX) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return existed


def replace_file(tmp: Path, path: Path) -> bool:
    """Rename the finished `tmp` over `path` (atomic on one filesystem) and fsync the folder; True if `path` existed
    (it was replaced). `tmp` is removed if the rename fails."""
    existed = path.exists()
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return existed


def save_figure(fig, path: str | Path, **savefig_kwargs) -> bool:
    """`fig.savefig` to `path` whole (temporary file, fsync, rename); True if it replaced an existing file. A full
    disk is a RunError naming the file; no temporary file is left."""
    path = Path(path)
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fix=REDO_FIX) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return existed
