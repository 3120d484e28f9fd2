"""Run folders and checkpoints.

A checkpoint `runs/<id>-<name>/checkpoints/epoch-XXXXXXX/` holds the PEFT adapter (adapter_config.json +
adapter_model.safetensors), `training_state.pt` (optimizer and grad-scaler state, read back with weights_only=True)
and `state.json` (counters, and `adapter_sha256`, the SHA-256 of adapter_model.safetensors, verified on resume). It is
written under a temporary name, its files and folder are fsynced, and it is renamed into place, so neither a crash nor
a power cut leaves a half checkpoint under a final name. A failed write (e.g. a full disk) removes the temporary
folder. No RNG state is needed: every random draw is reseeded from (seed, epoch, pair).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from fdfo.files import disk_full_error, fsync_path, is_disk_full, make_folder
from fdfo.models.registry import FAMILIES

CHECKPOINT_RE = re.compile(r"^epoch-(\d{7})$")
RUN_RE = re.compile(r"^(\d{5})-")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_state.pt", "state.json")
BEST_FILE = "best.json"  # names the checkpoint of the best held-out reward (fdfo/heldout.py): `RUN:best` for tools
BEST_SUFFIX = ":best"


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


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:07d}"


def clean_stale_files(run_dir: Path) -> None:
    """Undo what a killed process (kill -9, power cut) left half-done in a run folder; call with the run lock held.

    Temporary files and checkpoint folders are deleted. A checkpoint caught between its two renames in
    `save_checkpoint` (old copy moved aside, new one not yet in place) gets its old, complete copy back.
    """
    run_dir = Path(run_dir)
    for path in (*run_dir.glob(".*.tmp-*"), *run_dir.glob("images/.*.tmp-*")):
        path.unlink(missing_ok=True)
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for path in folder.glob(".epoch-*.old-*"):
        final = folder / path.name[1:].split(".old-")[0]
        if final.exists():
            shutil.rmtree(path)
        else:
            os.replace(path, final)
    for path in folder.glob(".epoch-*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def newest_checkpoint_in(folder: Path) -> Path | None:
    """The epoch-XXXXXXX entry of `folder` with the highest epoch; None when there is none (or no such folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    return found[-1][1] if found else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """A run folder's newest checkpoint, `run_dir/checkpoints/epoch-XXXXXXX`; None before the first save."""
    return newest_checkpoint_in(Path(run_dir) / "checkpoints")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder: Path, save_adapter, training_state: dict, counters: dict) -> None:
    """Write a complete checkpoint to `folder` atomically. `save_adapter(path)` writes the PEFT files.

    A failure while writing (a full disk, an interrupt) removes the temporary folder; a full disk becomes a RunError
    that says so, instead of torch's or safetensors' low-level traceback."""
    folder = Path(folder)
    make_folder(folder.parent)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_checkpoint_files(tmp, save_adapter, training_state, counters)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(folder.parent, f"checkpoint {folder.name}") from None
        raise
    if folder.exists():  # re-saving an epoch (e.g. after a resume): swap, then drop the old copy
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    fsync_path(folder.parent)


def _write_checkpoint_files(tmp: Path, save_adapter, training_state: dict, counters: dict) -> None:
    save_adapter(tmp)
    buffer = io.BytesIO()  # serialise in memory: torch's zip writer turns ENOSPC into an opaque RuntimeError
    torch.save(training_state, buffer)
    with open(tmp / "training_state.pt", "wb") as f:
        f.write(buffer.getbuffer())
    adapter = tmp / "adapter_model.safetensors"
    counters = counters | {"adapter_sha256": sha256_file(adapter)}
    (tmp / "state.json").write_text(json.dumps(counters, indent=2) + "\n")
    # safetensors creates its file 0600; give it the umask's permissions like every other file of the run
    os.chmod(adapter, (tmp / "state.json").stat().st_mode & 0o777)
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)


def read_checkpoint(folder: str | Path) -> tuple[dict, dict]:
    """Validate a checkpoint folder and return (counters, training_state). Loud errors for missing or damaged files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass runs/<run>/checkpoints/epoch-XXXXXXX")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {folder} is incomplete or damaged: missing {', '.join(missing)}. Delete it to "
                         f"resume from the previous checkpoint, or pass --resume-from another one.")
    damaged = (f"checkpoint {folder} is damaged ({{}}). Delete it to resume from the previous checkpoint, or pass "
               f"--resume-from another one.")
    try:
        counters = json.loads((folder / "state.json").read_text())
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(damaged.format(f"{e.__class__.__name__}: {e}")) from None
    if not isinstance(counters, dict):
        raise ValueError(damaged.format(f"state.json holds a {type(counters).__name__}, not an object"))
    for key in ("epoch", "global_step"):
        value = counters.get(key)
        if type(value) is not int or value < 0:
            raise ValueError(damaged.format(f"state.json {key!r} is {value!r}, not a count >= 0"))
    if not isinstance(state, dict) or not {"optimizer", "scaler"} <= set(state):
        raise ValueError(damaged.format("training_state.pt lacks the optimizer or scaler state"))
    if problem := state_problem(folder, counters):
        raise ValueError(damaged.format(problem))
    return counters, state


def state_problem(folder: Path, counters: dict) -> str | None:
    """What is wrong with a checkpoint's state.json against its folder, or None. Every reader of our checkpoints
    calls it (train.py's resume, and through fdfo.hub generate.py, metrics.py and fdfo.export): the adapter's
    SHA-256, when state.json records one (checkpoints without the record, e.g. the published ones, are read as they
    are), and the guidance scale, when it records one, must be a finite number, the model family a known one."""
    expected = counters.get("adapter_sha256")
    adapter = Path(folder) / "adapter_model.safetensors"
    if expected is not None and adapter.is_file():
        actual = sha256_file(adapter)
        if actual != expected:
            return (f"adapter_model.safetensors has SHA-256 {actual[:12]}..., state.json recorded "
                    f"{str(expected)[:12]}...: the file was modified or truncated")
    scale = counters.get("guidance_scale")
    if "guidance_scale" in counters and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                         or not math.isfinite(scale)):
        return f"state.json 'guidance_scale' is {scale!r}, not a finite number"
    family = counters.get("model_family")
    if "model_family" in counters and family not in FAMILIES:
        return f"state.json 'model_family' is {family!r}, not one of {', '.join(FAMILIES)}"
    return None


def adapter_settings(folder: Path) -> dict:
    """LoRA rank and alpha recorded in a checkpoint's adapter_config.json (a ValueError if unreadable)."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
        return {"lora_rank": config["r"], "lora_alpha": config["lora_alpha"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder} is damaged ({path.name}: {e.__class__.__name__}: {e}). Delete it to "
                         f"resume from the previous checkpoint, or pass --resume-from another one.") from None


def best_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint folder `run_dir/best.json` names (`{"epoch", "checkpoint", "heldout_reward_mean"}`, written by
    train.py's held-out evaluation): what `RUN:best` means to generate.py and metrics.py. Loud errors for a missing
    run folder, a run without best.json, a damaged file, or a checkpoint that is gone."""
    run_dir = Path(run_dir)
    spec = f"{run_dir}{BEST_SUFFIX}"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {spec!r}: no run folder {run_dir}")
    path = run_dir / BEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {spec!r}: {run_dir} has no {BEST_FILE}; train.py writes it at its "
                                f"held-out evaluations (--eval.every) once a trained checkpoint has been evaluated. "
                                f"Pass a checkpoint folder instead, e.g. {run_dir / 'checkpoints' / 'epoch-XXXXXXX'}")
    try:
        best = json.loads(path.read_text())
        name = best["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {spec!r}: {path} is damaged ({e.__class__.__name__}: {e})") from None
    parts = Path(name).parts if isinstance(name, str) else ()
    if len(parts) != 2 or parts[0] != "checkpoints" or not CHECKPOINT_RE.match(parts[1]):
        raise ValueError(f"checkpoint {spec!r}: {path} names {name!r}, not checkpoints/epoch-XXXXXXX")
    folder = run_dir / name
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {spec!r}: {path} names {name}, which is not in {run_dir} any more")
    return folder
