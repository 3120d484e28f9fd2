"""Prompt files, the named prompt sets, and the global prompt order of training.

Pair g (counted over the whole run: epoch * pairs_per_epoch + i) gets prompt `perm_p[g mod N]` where `perm_p` is a
permutation of the N prompts seeded by (seed, p) and p = g // N is the pass over the file. The loader position is
therefore a pure function of the counters: resuming, or changing the number of GPUs, continues the same sequence.

The named sets (ALGORITHM.md §8) are not shipped; fetch them into `prompt_sets/` (relative to the working directory,
like train.py's default `--prompt-file`):
    python -m fdfo.prompts download pickscore_train    # Pick-a-Pic training prompts, 25,432 lines (Flow-GRPO's list)
    python -m fdfo.prompts download hpdv2              # HPDv2 benchmark, 4 styles x 800 = 3,200 lines
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fdfo.checkpoints import write_text_atomic
from fdfo.distributed import warn0
from fdfo.rng import derive_seed

PROMPT_SET_DIR = Path("prompt_sets")
PICKSCORE_TRAIN_URL = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/train.txt"
HPDV2_REPO = "zhwang/HPDv2"  # a Hugging Face dataset repository
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # the order of the lines in hpdv2.txt
HPDV2_PER_STYLE = 800


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    description: str  # what it is and how many lines, for messages and --help
    lines: int  # expected number of prompts


PROMPT_SETS = {
    "pickscore_train": PromptSet("pickscore_train", "the Pick-a-Pic training prompts (25,432 lines; Flow-GRPO ships "
                                 "them as dataset/pickscore/train.txt)", 25_432),
    "hpdv2": PromptSet("hpdv2", "the HPDv2 benchmark prompts (3,200 lines: 800 each of anime, concept-art, paintings, "
                       "photo)", len(HPDV2_STYLES) * HPDV2_PER_STYLE),
}


def download_command(name: str) -> str:
    return f"python -m fdfo.prompts download {name}"


# File name -> how to get it; train.py's missing --prompt-file message (tests/test_cli.py checks its wording).
HOW_TO_GET = {
    f"{s.name}.txt": (
        f"It is {s.description}, one prompt per line. Fetch it with `{download_command(s.name)}` (run from the "
        f"repository root; writes {PROMPT_SET_DIR / s.name}.txt), or pass --prompt-file PATH with any "
        "one-prompt-per-line file."
    )
    for s in PROMPT_SETS.values()
}
PROMPT_STREAM = 0x5052  # separates the prompt-order seeds from the noise seeds


def load_prompts(path: str | Path, hint: str | None = None) -> list[str]:
    """Read one prompt per line, skipping blank lines. Missing or empty file -> FileNotFoundError/ValueError whose
    message ends with `hint` (default: how to get the file, or how to pass another one)."""
    path = Path(path)
    if hint is None:
        hint = HOW_TO_GET.get(path.name, "Pass --prompt-file with a text file holding one prompt per line.")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found. {hint}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts. {hint}")
    return prompts


def load_prompt_set(name_or_path: str, option: str = "--prompt-set") -> list[str]:
    """The prompts of a named set (`prompt_sets/<name>.txt`) or of a text file given by its path."""
    if name_or_path in PROMPT_SETS:
        path = PROMPT_SET_DIR / f"{name_or_path}.txt"
        hint = (f"The prompt set {name_or_path!r} is {PROMPT_SETS[name_or_path].description}. Fetch it with "
                f"`{download_command(name_or_path)}` (run from the repository root), or give {option} the path of "
                "a text file with one prompt per line.")
        return load_prompts(path, hint)
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(f"{option} {name_or_path!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor "
                                "an existing text file with one prompt per line.")
    return load_prompts(name_or_path, f"Give {option} a text file with one prompt per line.")


def prompt_indices(num_prompts: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of the prompts of global pairs start .. start + count - 1."""
    out, perms = [], {}
    for g in range(start, start + count):
        p = g // num_prompts
        if p not in perms:
            gen = torch.Generator().manual_seed(derive_seed(seed, PROMPT_STREAM, p))
            perms[p] = torch.randperm(num_prompts, generator=gen).tolist()
        out.append(perms[p][g % num_prompts])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Downloading the named sets


def fetch_pickscore_train(url: str = PICKSCORE_TRAIN_URL) -> list[str]:
    """The Pick-a-Pic training prompts from Flow-GRPO's repository (plain HTTPS, no hub)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as err:
        reason = str(err).rstrip(".")
        raise FileNotFoundError(f"could not download {url}: {reason}. Download that file by hand and save it as "
                                f"{PROMPT_SET_DIR / 'pickscore_train.txt'}.") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def fetch_hpdv2() -> list[str]:
    """The four HPDv2 benchmark files of the Hugging Face dataset `zhwang/HPDv2`, in `HPDV2_STYLES` order.

    Each `benchmark/<style>.json` is a JSON list of prompts; whitespace inside a prompt (newlines included) is
    collapsed to single spaces so that every prompt is one line.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    prompts = []
    for style in HPDV2_STYLES:
        filename = f"benchmark/{style}.json"
        try:
            path = hf_hub_download(HPDV2_REPO, filename, repo_type="dataset")
        except (OSError, EntryNotFoundError) as err:
            reason = str(err).rstrip(".")
            raise FileNotFoundError(
                f"could not get {filename} of the Hugging Face dataset {HPDV2_REPO}: {reason}. It needs network access "
                f"to huggingface.co or the file in the Hugging Face cache (`hf download {HPDV2_REPO} --repo-type "
                "dataset`, then HF_HUB_OFFLINE=1 works).") from err
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{HPDV2_REPO}/{filename} is not a JSON list of prompt strings.")
        style_prompts = [" ".join(entry.split()) for entry in entries if entry.strip()]
        if len(style_prompts) != HPDV2_PER_STYLE:
            warn0(f"{HPDV2_REPO}/{filename} holds {len(style_prompts)} prompts, expected {HPDV2_PER_STYLE}.")
        prompts += style_prompts
    return prompts


FETCHERS = {"pickscore_train": fetch_pickscore_train, "hpdv2": fetch_hpdv2}


def download(name: str, out_dir: str | Path = PROMPT_SET_DIR) -> Path:
    """Fetch the named set and write it to `out_dir/<name>.txt` (one prompt per line); returns the path."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}.")
    prompts = FETCHERS[name]()
    expected = PROMPT_SETS[name].lines
    if len(prompts) != expected:
        warn0(f"{name} has {len(prompts):,} prompts, expected {expected:,}: the source may have changed, so results "
              "may not be comparable with published numbers.")
    path = Path(out_dir) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(prompt + "\n" for prompt in prompts))  # a failed download leaves no half file
    return path


def main(argv: list[str] | None = None) -> None:
    from fdfo.cli import guarded

    parser = argparse.ArgumentParser(prog="python -m fdfo.prompts", description="Fetch a named prompt set.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download a prompt set into prompt_sets/")
    fetch.add_argument("name", choices=list(PROMPT_SETS))
    fetch.add_argument("--out-dir", default=str(PROMPT_SET_DIR), help="folder to write <name>.txt into")
    args = parser.parse_args(argv)

    def run() -> None:
        path = download(args.name, args.out_dir)
        print(f"wrote {path} ({len(load_prompts(path)):,} prompts)")

    guarded(run)


if __name__ == "__main__":
    main()
