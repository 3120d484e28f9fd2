"""Run folders and checkpoints.

A checkpoint `runs/<id>-<name>/checkpoints/epoch-XXXXXXX/` holds the PEFT adapter (adapter_config.json +
adapter_model.safetensors), `training_state.pt` (optimizer and grad-scaler state, read back with weights_only=True)
and `state.json` (counters). It is written under a temporary name and renamed into place, so a crash never leaves a
half checkpoint. No RNG state is needed: every random draw is reseeded from (seed, epoch, pair).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^epoch-(\d{7})$")
RUN_RE = re.compile(r"^(\d{5})-")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_state.pt", "state.json")


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create `root/<next 5-digit id>-<name>/`; never reuses an existing folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in root.iterdir() if (m := RUN_RE.match(p.name))]
    next_id = max(ids, default=-1) + 1
    while True:
        path = root / f"{next_id:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another launcher took this id meanwhile
            next_id += 1


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name and rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    return found[-1][1] if found else None


def save_checkpoint(folder: Path, save_adapter, training_state: dict, counters: dict) -> None:
    """Write a complete checkpoint to `folder` atomically. `save_adapter(path)` writes the PEFT files."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(tmp)
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps(counters, indent=2) + "\n")
    if folder.exists():  # re-saving an epoch (e.g. after a resume): swap, then drop the old copy
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def read_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """Validate a checkpoint folder and return (counters, training_state). Loud errors for missing or damaged files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass runs/<run>/checkpoints/epoch-XXXXXXX")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {folder} is incomplete or damaged: missing {', '.join(missing)}. Delete it to "
                         f"resume from the previous checkpoint, or pass --resume-from another one.")
    try:
        counters = json.loads((folder / "state.json").read_text())
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {folder} is damaged ({e.__class__.__name__}: {e}). Delete it to resume from "
                         f"the previous checkpoint, or pass --resume-from another one.") from None
    return counters, state
