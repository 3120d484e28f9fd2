"""Checkpoint resolution: turn what a user pastes after --checkpoint into a local PEFT adapter folder.

Accepted forms (docs/algorithm.md §9):

* `https://huggingface.co/ORG/REPO/tree/REV/SUB/DIR` — the address of a folder as the browser shows it (`blob/` and
  `resolve/` addresses of `adapter_config.json` or `adapter_model.safetensors` are taken as their folder);
* `https://huggingface.co/ORG/REPO` — an adapter at the root of a repository;
* `hf:ORG/REPO[@REV][/SUB/DIR]`;
* a local folder holding `adapter_config.json` + `adapter_model.safetensors` (PEFT format), or
  `pytorch_lora_weights.safetensors` (diffusers format, as `fdfo.export` or diffusers' `save_lora_weights` write it);
* one of our run checkpoints `runs/<id>-<name>/checkpoints/epoch-XXXXXXX`, or a run folder (its newest checkpoint),
  or a run folder followed by `:best` (the checkpoint its best.json names: the best held-out reward);
* nothing (None, "", "base"): the base model.

Only the named folder's adapter files (and `state.json`, when there is one) are downloaded, through the Hugging Face
cache, so `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` are honoured. Hub addresses are percent-decoded before they are
checked: no `.`/`..` component and no encoded separator (`%2F`, `%5C`) may reach the cache paths, except `%2F`
inside a revision such as `refs%2Fpr%2F3` (each of whose parts must be a plain name).

The guidance scale a checkpoint was trained with comes from our `state.json`, else from the known public
repositories (`KNOWN_GUIDANCE`: Flow-GRPO 4.5, DiffusionNFT 1.0; docs/algorithm.md §9), else from the published FDFO
folder names (`...-no-cfg` = 1, `...-cfg-2.0`, `...-cfg-4.5`).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from fdfo.checkpoints import BEST_SUFFIX, best_checkpoint, newest_checkpoint_in, state_problem
from fdfo.hub_names import BASE_NAMES, HUB_HOSTS, is_hub_address
from fdfo.offline import ensure_hub_reachable

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT format
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers format (fdfo.export, save_lora_weights)
STATE_FILE = "state.json"
FORMS = ("https://huggingface.co/ORG/REPO/tree/REV/SUB/DIR, https://huggingface.co/ORG/REPO, hf:ORG/REPO[/SUB/DIR], "
         "a local PEFT folder (adapter_config.json + adapter_model.safetensors) or diffusers LoRA folder "
         "(pytorch_lora_weights.safetensors), a run folder (RUN:best: its best held-out checkpoint) or "
         "runs/<run>/checkpoints/epoch-XXXXXXX, or 'base'")
_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_NO_CFG_RE = re.compile(r"(?:^|[-_])no-cfg(?:$|[-_])")
_CFG_RE = re.compile(r"(?:^|[-_])cfg-(\d+(?:\.\d+)?)(?:$|[-_])")
_ENCODED_SEPARATOR_RE = re.compile(r"%(2f|5c)", re.IGNORECASE)
# Public baselines and the guidance scale they were trained and evaluated with (docs/algorithm.md §9); keys lower case.
KNOWN_GUIDANCE = {
    "jieliu/sd3.5m-flowgrpo-geneval": 4.5,
    "jieliu/sd3.5m-flowgrpo-pickscore": 4.5,
    "jieliu/sd3.5m-flowgrpo-text": 4.5,
    "worstcoder/sd3.5m-diffusionnft-multireward": 1.0,
}


@dataclass(frozen=True)
class HubRef:
    """A folder of a Hugging Face model repository; subfolder "" is the root, revision None the default branch."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf:{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")

    @property
    def url(self) -> str:
        tail = f"/tree/{self.revision or 'main'}/{self.subfolder}" if self.subfolder else ""
        return f"https://huggingface.co/{self.repo_id}{tail}"


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint. adapter_dir None is the base model.

    guidance_scale: the CFG scale it was trained with (from state.json or the folder name), None when unknown;
    pretrained_model: the base model recorded in our state.json, None when not recorded; model_family: its family
    ("sd3", "flux"; fdfo/models/registry.py) as recorded there, None when not recorded;
    resolution, num_steps: what it was trained at (our state.json, else its run's config.json), None when unknown.
    """

    adapter_dir: Path | None
    description: str
    label: str
    guidance_scale: float | None = None
    guidance_source: str | None = None
    pretrained_model: str | None = None
    resolution: int | None = None  # the training run's image size and Euler steps, when recorded
    num_steps: int | None = None
    model_family: str | None = None


def _decode(part: str, spec: str, revision: bool = False) -> str:
    """One percent-decoded path component of a hub address, checked: it must stay one plain name inside the cache.

    revision: the component names a revision, where an encoded `/` is allowed (`refs%2Fpr%2F3`) if every piece
    between the slashes is a plain name."""
    if _ENCODED_SEPARATOR_RE.search(part) and not (revision and "%5c" not in part.lower()):
        raise ValueError(f"checkpoint {spec!r}: encoded path separators (%2F, %5C) are not allowed in a hub path")
    decoded = urllib.parse.unquote(part)
    pieces = decoded.split("/") if revision else [decoded]
    for piece in pieces:
        if piece in ("", ".", "..") or "\\" in piece or "/" in piece or "%" in piece or "\0" in piece:
            raise ValueError(f"checkpoint {spec!r}: {part!r} decodes to {decoded!r}; '.' and '..', separators and "
                             f"doubly encoded characters are not allowed in a hub path")
    return decoded


def _parts(path: str, spec: str, revision_at: int | None = None) -> list[str]:
    """The decoded components of a hub path; component `revision_at` may be a revision with encoded slashes."""
    return [_decode(p, spec, i == revision_at) for i, p in enumerate(q for q in path.split("/") if q)]


def _check_repo(org: str, name: str, spec: str) -> str:
    if not (_NAME_RE.match(org) and _NAME_RE.match(name)):
        raise ValueError(f"checkpoint {spec!r}: {org}/{name} is not a valid repository id. Expected {FORMS}.")
    return f"{org}/{name}"


def _parse_url(spec: str) -> HubRef:
    url = urllib.parse.urlsplit(spec if "://" in spec else "https://" + spec)
    if url.scheme not in ("http", "https") or url.netloc.lower() not in HUB_HOSTS:
        raise ValueError(f"checkpoint {spec!r} is not a Hugging Face address. Expected {FORMS}.")
    raw = [p for p in url.path.split("/") if p]
    revision_at = 3 if len(raw) > 3 and raw[2] in ("tree", "blob", "resolve") else None
    parts = _parts(url.path, spec, revision_at)
    if parts and parts[0] in ("datasets", "spaces", "buckets"):
        raise ValueError(f"checkpoint {spec!r} points to a {parts[0][:-1]}, not a model repository")
    if len(parts) < 2:
        raise ValueError(f"checkpoint {spec!r} names no repository: expected https://huggingface.co/ORG/REPO or "
                         f"https://huggingface.co/ORG/REPO/tree/main/SUB/DIR")
    repo_id = _check_repo(parts[0], parts[1], spec)
    if len(parts) == 2:
        return HubRef(repo_id)
    kind, rest = parts[2], parts[3:]
    if kind not in ("tree", "blob", "resolve") or not rest:
        raise ValueError(f"checkpoint {spec!r}: expected /tree/REVISION/FOLDER after the repository name (copy the "
                         f"folder's address from the repository's 'Files' tab), e.g. "
                         f"https://huggingface.co/{repo_id}/tree/main/SUB/DIR")
    revision, folder = rest[0], rest[1:]
    if kind != "tree":  # the address of a file: take its folder
        if not folder or folder[-1] not in (*ADAPTER_FILES, STATE_FILE, DIFFUSERS_FILE):
            raise ValueError(f"checkpoint {spec!r} is the address of a file; pass its folder "
                             f"(https://huggingface.co/{repo_id}/tree/{revision}/...)")
        folder = folder[:-1]
    return HubRef(repo_id, "/".join(folder), None if revision == "main" else revision)


def _parse_hf(spec: str) -> HubRef:
    raw = [p for p in spec[len("hf:"):].split("/") if p]
    if len(raw) < 2:
        raise ValueError(f"checkpoint {spec!r} names no repository: expected hf:ORG/REPO[/SUB/DIR]")
    name, _, revision = raw[1].partition("@")
    org, name = _decode(raw[0], spec), _decode(name, spec)
    revision = _decode(revision, spec, revision=True) if revision else None
    folder = [_decode(p, spec) for p in raw[2:]]
    return HubRef(_check_repo(org, name, spec), "/".join(folder), revision)


def parse_hub_ref(spec: str) -> HubRef | None:
    """The hub folder named by `spec`, or None when `spec` is not a hub reference. Malformed ones: ValueError."""
    if not is_hub_address(spec):
        return None
    return _parse_hf(spec) if spec.startswith("hf:") else _parse_url(spec)


def infer_guidance_scale(path: str) -> float | None:
    """The CFG scale a published FDFO folder was trained with, from its name: `-no-cfg` = 1, `-cfg-4.5` = 4.5.

    Looks at the path components from the innermost outwards; None when no component says.
    """
    for part in reversed([p for p in re.split(r"[/\\]", path) if p]):
        if _NO_CFG_RE.search(part):
            return 1.0
        if m := _CFG_RE.search(part):
            return float(m.group(1))
    return None


def _read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {folder}: {STATE_FILE} is damaged ({e})") from None
    return state if isinstance(state, dict) else {}


def _missing_adapter_files(folder: Path) -> list[str]:
    """[] when `folder` holds a PEFT adapter or a diffusers LoRA file, else the PEFT files it lacks."""
    if (folder / DIFFUSERS_FILE).is_file() and not (folder / ADAPTER_FILES[0]).is_file():
        return []
    return [f for f in ADAPTER_FILES if not (folder / f).is_file()]


def known_guidance_scale(repo_id: str) -> float | None:
    """The guidance scale a known public baseline repository was trained and evaluated with, else None."""
    return KNOWN_GUIDANCE.get(repo_id.lower())


def _checkpoint(folder: Path, description: str, label: str, name_for_cfg: str, repo_id: str | None = None
                ) -> Checkpoint:
    missing = _missing_adapter_files(folder)
    if missing:
        raise FileNotFoundError(f"checkpoint {description}: no {' or '.join(missing)} in {folder}; a checkpoint "
                                f"folder holds a PEFT adapter (adapter_config.json + adapter_model.safetensors) or "
                                f"a diffusers LoRA ({DIFFUSERS_FILE})")
    state = _read_state(folder)
    if problem := state_problem(folder, state):
        raise ValueError(f"checkpoint {description} is damaged: {problem} (in {folder}). Use another checkpoint, or "
                         f"copy or download this one again.")
    scale, source = state.get("guidance_scale"), STATE_FILE
    if scale is None and repo_id is not None and known_guidance_scale(repo_id) is not None:
        scale, source = known_guidance_scale(repo_id), f"repository ({repo_id} is known to use it)"
    if scale is None:
        scale, source = infer_guidance_scale(name_for_cfg), "folder name"
    resolution, steps = state.get("resolution"), state.get("num_solver_steps")
    if (resolution is None or steps is None) and folder.parent.name == "checkpoints":  # an older state.json: the run's
        sample = _read_json(folder.parent.parent / "config.json").get("sample")
        if isinstance(sample, dict):
            resolution, steps = sample.get("resolution"), sample.get("num_solver_steps")
    return Checkpoint(folder, description, label, None if scale is None else float(scale),
                      None if scale is None else source, state.get("pretrained_model"), _count(resolution),
                      _count(steps), state.get("model_family"))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _count(value) -> int | None:
    return value if type(value) is int and value > 0 else None


def _local_adapter_dir(path: Path) -> Path:
    """A PEFT folder as given, the newest epoch-XXXXXXX of a run folder or of its checkpoints/ folder."""
    if path.is_file() and path.name in (*ADAPTER_FILES, STATE_FILE, DIFFUSERS_FILE):
        return path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is neither a folder nor a file of an adapter")
    if any((path / f).exists() for f in (*ADAPTER_FILES, DIFFUSERS_FILE)):
        return path
    for parent in (path, path / "checkpoints"):
        if (newest := newest_checkpoint_in(parent)) is not None:
            return newest
    if (path / "checkpoints").is_dir() or (path / "log.jsonl").is_file():
        raise FileNotFoundError(f"run folder {path} has no checkpoint yet (checkpoints/epoch-XXXXXXX)")
    raise FileNotFoundError(f"{path} holds no adapter (adapter_config.json + adapter_model.safetensors, or "
                            f"{DIFFUSERS_FILE}) and is not a run folder with checkpoints/epoch-XXXXXXX")


def download_adapter(ref: HubRef) -> Path:
    """Fetch only `ref`'s adapter files (and state.json, if any) into the HF cache; returns the local folder."""
    from huggingface_hub import constants, errors, snapshot_download

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    where = f"folder {ref.subfolder!r} of {ref.repo_id}" if ref.subfolder else f"the root of {ref.repo_id}"
    rev = f" at revision {ref.revision!r}" if ref.revision else ""
    fetch = f"hf download {ref.repo_id} {' '.join(prefix + f for f in ADAPTER_FILES)}" + (
        f" --revision {ref.revision}" if ref.revision else "")
    ensure_hub_reachable([str(ref)])
    try:
        root = snapshot_download(ref.repo_id, revision=ref.revision,
                                 allow_patterns=[prefix + f for f in (*ADAPTER_FILES, DIFFUSERS_FILE, STATE_FILE)])
    except errors.GatedRepoError:
        raise FileNotFoundError(f"checkpoint {ref}: {ref.repo_id} is gated; accept its terms on "
                                f"https://huggingface.co/{ref.repo_id} and log in (`hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"checkpoint {ref}: no model repository {ref.repo_id} on the Hugging Face hub (or it "
                                f"is private: log in with `hf auth login`). Check the address.") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"checkpoint {ref}: {ref.repo_id} has no revision {ref.revision!r}") from None
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError, errors.HfHubHTTPError, OSError) as e:
        offline = "HF_HUB_OFFLINE=1 is set and " if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"checkpoint {ref}: {offline}{where}{rev} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and could not be downloaded ({e.__class__.__name__}). Fix: download it where there is network access "
            f"(`{fetch}`), or pass a local folder.") from None
    folder = Path(root) / ref.subfolder
    missing = _missing_adapter_files(folder)
    if missing:
        offline = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"checkpoint {ref}: {where}{rev} holds no {' and no '.join(missing)}{offline}. Check the folder on "
            f"{ref.url}; checkpoints are folders such as .../tree/main/<run>/epoch-XXXXXXX. To fetch it: `{fetch}`.")
    return folder


def resolve_checkpoint(spec: str | None) -> Checkpoint:
    """Resolve any accepted --checkpoint form (module docstring) to a local adapter folder plus what is known about
    it. None, "" and "base" are the base model. Bad addresses: ValueError; missing folders: FileNotFoundError."""
    spec = None if spec is None else spec.strip()
    if spec is None or spec.lower() in BASE_NAMES:
        return Checkpoint(None, "base model", "base model", None, None, None)
    ref = parse_hub_ref(spec)
    if ref is not None:
        folder = download_adapter(ref)
        label = ref.subfolder or ref.repo_id.split("/")[1]
        return _checkpoint(folder, str(ref), label, f"{ref.repo_id.split('/')[1]}/{ref.subfolder}",
                           ref.repo_id)
    path = Path(spec).expanduser()
    if spec.endswith(BEST_SUFFIX):
        path = best_checkpoint(Path(spec[:-len(BEST_SUFFIX)]).expanduser())
    if not path.exists():
        hint = (f" For a Hugging Face repository write hf:{spec} or https://huggingface.co/{spec}."
                if re.match(r"^[\w.-]+/[\w.-]+(/.*)?$", spec) else "")
        raise FileNotFoundError(f"checkpoint {spec!r}: no such file or folder.{hint} Accepted: {FORMS}.")
    folder = _local_adapter_dir(path)
    parts = folder.resolve().parts
    label = f"{parts[-3]}/{parts[-1]}" if len(parts) > 2 and parts[-2] == "checkpoints" else "/".join(parts[-2:])
    return _checkpoint(folder, str(folder), label, str(folder.resolve()))
