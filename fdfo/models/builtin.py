"""Built-in model folders (`builtin:tiny-...`): pipelines built in code, saved once with `save_pretrained` into a shared
cache, then loaded with the same `from_pretrained` call a real model folder gets.

The cache is $FDFO_TINY_CACHE, default ~/.cache/fdfo; each model has a versioned folder name (bump it whenever the
built weights or configs change).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import torch


def cache_folder(name: str) -> pathlib.Path:
    """$FDFO_TINY_CACHE/<name>, default ~/.cache/fdfo/<name>."""
    parent = os.environ.get("FDFO_TINY_CACHE") or pathlib.Path.home() / ".cache" / "fdfo"
    return pathlib.Path(parent) / name


def build_once(out_dir: str | os.PathLike, make_pipeline: Callable[[], object], seed: int = 0) -> pathlib.Path:
    """Save `make_pipeline()` into `out_dir` unless a model is already there; return the folder.

    Weights come from `torch.manual_seed(seed)` inside a forked RNG, so the caller's random state is untouched and
    equal seeds give identical weights. The folder is written under a temporary sibling name and renamed into place,
    so a crash or a concurrent builder never leaves a half-written model: if another process renames first, its
    (identical) build is kept and ours is discarded.
    """
    out_dir = pathlib.Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should read like any other model folder
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            make_pipeline().save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError as err:  # another builder renamed first (fine), or out_dir holds something else (not fine)
            if not (out_dir / "model_index.json").exists():
                raise FileExistsError(f"{out_dir} exists but holds no model_index.json; delete it and retry") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir
