"""Prompt files, the named prompt sets, and the global prompt order of training.

Pair g (counted over the whole run: epoch * pairs_per_epoch + i) gets prompt `perm_p[g mod N]` where `perm_p` is a
permutation of the N prompts seeded by (seed, p) and p = g // N is the pass over the file. The loader position is
therefore a pure function of the counters: resuming, or changing the number of GPUs, continues the same sequence.

The named sets (docs/algorithm.md §8, §9) are not shipped; fetch them into `prompt_sets/` (relative to the working
directory, like train.py's default `--prompt-file`):
    python -m fdfo.prompts download pickscore_train  # Pick-a-Pic training prompts, 25,432 lines, pinned and verified
    python -m fdfo.prompts download pickscore_test   # Pick-a-Pic test prompts, 2,048 lines: held-out evaluation
    python -m fdfo.prompts download hpdv2            # HPDv2 benchmark, 4 styles x 800 = 3,200 prompts (JSON list)

pickscore_train.txt and pickscore_test.txt are Flow-GRPO's files at a pinned commit, checked against their line
counts and sha256 (Flow-GRPO split unique Pick-a-Pic captions into the two, so they share no prompt); hpdv2.json is
the four benchmark files of the Hugging Face dataset concatenated in a fixed order, verbatim (a prompt may hold a line
break, so the set is a JSON list, not a text file).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fdfo.rng import derive_seed

PROMPT_SET_DIR = Path("prompt_sets")
# docs/algorithm.md §9: the commit the FDFO authors pin (the file is unchanged since that repository's first commit)
PICKSCORE_TRAIN_COMMIT = "9745241cf1101407e9b518dd4f10498092150522"
PICKSCORE_TRAIN_URL = (f"https://raw.githubusercontent.com/yifan123/flow_grpo/{PICKSCORE_TRAIN_COMMIT}/"
                       "dataset/pickscore/train.txt")
PICKSCORE_TRAIN_LINES = 25_432
PICKSCORE_TRAIN_SHA256 = "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f"
PICKSCORE_TEST_URL = PICKSCORE_TRAIN_URL.replace("/train.txt", "/test.txt")  # the held-out prompts, same commit
PICKSCORE_TEST_LINES = 2_048
PICKSCORE_TEST_SHA256 = "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"
HPDV2_REPO = "zhwang/HPDv2"  # a Hugging Face dataset repository
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # the order of the prompts in hpdv2.json
HPDV2_PER_STYLE = 800


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    description: str  # what it is and how many lines, for messages and --help
    lines: int  # expected number of prompts
    file: str  # its file name in prompt_sets/


PROMPT_SETS = {
    "pickscore_train": PromptSet("pickscore_train", "the Pick-a-Pic training prompts (25,432 lines; Flow-GRPO ships "
                                 "them as dataset/pickscore/train.txt)", PICKSCORE_TRAIN_LINES, "pickscore_train.txt"),
    "pickscore_test": PromptSet("pickscore_test", "the Pick-a-Pic test prompts (2,048 lines, none of them a training "
                                "prompt; Flow-GRPO ships them as dataset/pickscore/test.txt)", PICKSCORE_TEST_LINES,
                                "pickscore_test.txt"),
    "hpdv2": PromptSet("hpdv2", "the HPDv2 benchmark prompts (3,200 lines: 800 each of anime, concept-art, paintings, "
                       "photo)", len(HPDV2_STYLES) * HPDV2_PER_STYLE, "hpdv2.json"),
}


def download_command(name: str) -> str:
    return f"python -m fdfo.prompts download {name}"


# File name -> how to get it; train.py's missing --prompt-file message (tests/test_cli.py checks its wording).
HOW_TO_GET = {
    s.file: (
        f"It is {s.description}. Fetch it with `{download_command(s.name)}` (run from the repository root; writes "
        f"{PROMPT_SET_DIR / s.file}), or pass --prompt-file PATH with any one-prompt-per-line file."
    )
    for s in PROMPT_SETS.values()
}
PROMPT_STREAM = 0x5052  # separates the prompt-order seeds from the noise seeds
# SD3's text encoders read at most 77 CLIP tokens and T5_MAX_LENGTH = 128 T5 tokens (fdfo/models/sd3.py), FLUX's 77
# and 512; a token spans at most 16 characters (sentencepiece's default piece length; CLIP's BPE pieces are shorter),
# and both tokenisers collapse runs of whitespace: SD3 reads no character past 2,048 of a prompt, FLUX none past 8,192.
# Longer prompts are cut at 8,192 characters, on load: a 10 MB line would otherwise be tokenised in full at every epoch.
CLIP_TOKENS, T5_TOKENS = 77, 128
MAX_PROMPT_CHARS = 8192


def load_prompts(path: str | Path, hint: str | None = None) -> list[str]:
    """Read one prompt per line, skipping blank lines. Missing or empty file -> FileNotFoundError/ValueError whose
    message ends with `hint` (default: how to get the file, or how to pass another one)."""
    path = Path(path)
    if hint is None:
        hint = HOW_TO_GET.get(path.name, "Pass --prompt-file with a text file holding one prompt per line.")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found. {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {err.start}: {err.reason}). Save it as UTF-8, "
                         "one prompt per line.") from None
    numbered = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise ValueError(f"prompt file {path} holds no prompts. {hint}")
    return cut_long_prompts(numbered, path, "line")


def cut_long_prompts(numbered: list[tuple[int, str]], path: Path, unit: str) -> list[str]:
    """The prompts, each cut to MAX_PROMPT_CHARS characters, with one warning naming the first (and counting the other)
    over-long ones. Prompts within the limit, i.e. every prompt the text encoders could read in full, are unchanged."""
    long = [(number, len(prompt)) for number, prompt in numbered if len(prompt) > MAX_PROMPT_CHARS]
    if long:
        from fdfo import distributed as dist

        number, size = long[0]
        others = f" (and {len(long) - 1} more {unit}{'s' if len(long) > 2 else ''})" if len(long) > 1 else ""
        dist.warn0(f"prompt file {path} {unit} {number}{others} holds {size:,} characters; the text encoders read at "
                   f"most {CLIP_TOKENS} + {T5_TOKENS} tokens, so it is cut to its first {MAX_PROMPT_CHARS:,} "
                   f"characters (what they read is unchanged)")
    return [prompt[:MAX_PROMPT_CHARS] for _, prompt in numbered]


REPOSITORY = Path(__file__).resolve().parents[1]  # the checkout this code runs from


def recorded_path(path: str) -> str:
    """How a run's config.json records the prompt file: relative to the repository when the file is inside it, so
    that `--config` replays on another clone or machine; else absolute (`replayed_path` reads it back)."""
    absolute = Path(path).expanduser().resolve()
    return absolute.relative_to(REPOSITORY).as_posix() if absolute.is_relative_to(REPOSITORY) else str(absolute)


def replayed_path(recorded: str) -> str:
    """The file a path recorded by `recorded_path` names here: a relative one inside this repository."""
    path = Path(recorded).expanduser()
    return str(path if path.is_absolute() else REPOSITORY / path)


def load_prompt_list(path: str | Path, hint: str) -> list[str]:
    """A JSON list of prompt strings, used verbatim (no whitespace changes, docs/algorithm.md §9)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found. {hint}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"prompt file {path} is not a UTF-8 JSON list of prompts ({err}). {hint}") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError(f"prompt file {path} is not a JSON list of prompt strings. {hint}")
    if not entries:
        raise ValueError(f"prompt file {path} holds no prompts. {hint}")
    return cut_long_prompts(list(enumerate(entries, 1)), path, "entry")


def load_prompt_set(name_or_path: str, option: str = "--prompt-set") -> list[str]:
    """The prompts of a named set (`prompt_sets/pickscore_train.txt`, `prompt_sets/hpdv2.json`) or of a file given by
    its path: a `.json` file is a JSON list of prompts (verbatim), any other file holds one prompt per line."""
    if name_or_path in PROMPT_SETS:
        spec = PROMPT_SETS[name_or_path]
        path = PROMPT_SET_DIR / spec.file
        hint = (f"The prompt set {name_or_path!r} is {spec.description}. Fetch it with "
                f"`{download_command(name_or_path)}` (run from the repository root), or give {option} the path of "
                "a text file with one prompt per line.")
        return load_prompt_list(path, hint) if path.suffix == ".json" else load_prompts(path, hint)
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(f"{option} {name_or_path!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor "
                                "an existing text file with one prompt per line.")
    if Path(name_or_path).suffix == ".json":
        return load_prompt_list(name_or_path, f"Give {option} a JSON list of prompt strings.")
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_pickscore_train(revision: str | None = None) -> str:
    """Flow-GRPO's `dataset/pickscore/train.txt` at the pinned commit (plain HTTPS, no hub), verified: its prompt count
    (`[line.strip() for line in file if line.strip()]`) and the sha256 of its bytes must be those of docs/algorithm.md
    §9. Returns the file's text, to be stored unchanged."""
    return _fetch_pinned("pickscore_train", PICKSCORE_TRAIN_URL, PICKSCORE_TRAIN_LINES, PICKSCORE_TRAIN_SHA256,
                         revision)


def fetch_pickscore_test(revision: str | None = None) -> str:
    """Flow-GRPO's `dataset/pickscore/test.txt` at the same pinned commit, verified as `fetch_pickscore_train`."""
    return _fetch_pinned("pickscore_test", PICKSCORE_TEST_URL, PICKSCORE_TEST_LINES, PICKSCORE_TEST_SHA256, revision)


def _fetch_pinned(name: str, url: str, lines: int, sha256: str, revision: str | None) -> str:
    """The text at `url`, checked: UTF-8, and the pinned sha256 (else: the prompt count when it differs from `lines`,
    or the digest)."""
    file = PROMPT_SETS[name].file
    if revision is not None:
        raise ValueError(f"--revision {revision!r}: {name} is pinned to flow_grpo commit "
                         f"{PICKSCORE_TRAIN_COMMIT}; --revision applies to hpdv2 only.")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = str(err).rstrip(".")
        raise FileNotFoundError(f"could not download {url}: {reason}. Download that file by hand and save it as "
                                f"{PROMPT_SET_DIR / file} (sha256 {sha256}).") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{url} is not UTF-8 text ({err}); nothing was written.") from None
    digest = sha256_hex(data)
    if digest == sha256:
        return text
    count = len([line.strip() for line in text.splitlines() if line.strip()])
    if count != lines:
        raise ValueError(f"{url} holds {count:,} prompts, expected {lines:,}: not the pinned file, nothing was "
                         "written.")
    raise ValueError(f"{url} has sha256 {digest}, expected {sha256}: not the pinned file, nothing was written.")


def fetch_hpdv2(revision: str | None = None) -> str:
    """The four HPDv2 benchmark files of the Hugging Face dataset `zhwang/HPDv2` (at `revision`, default its main
    branch), in `HPDV2_STYLES` order, as the text of one JSON list of 3,200 prompts.

    Each `benchmark/<style>.json` must be a JSON list of exactly 800 strings; the prompts are kept verbatim (no
    whitespace changes, docs/algorithm.md §9).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    prompts = []
    for style in HPDV2_STYLES:
        filename = f"benchmark/{style}.json"
        try:
            path = hf_hub_download(HPDV2_REPO, filename, repo_type="dataset", revision=revision)
        except (OSError, EntryNotFoundError, RevisionNotFoundError) as err:
            reason = str(err).rstrip(".")
            raise FileNotFoundError(
                f"could not get {filename} of the Hugging Face dataset {HPDV2_REPO}"
                f"{f' at revision {revision}' if revision else ''}: {reason}. It needs network access to "
                f"huggingface.co or the file in the Hugging Face cache (`hf download {HPDV2_REPO} --repo-type "
                "dataset`, then HF_HUB_OFFLINE=1 works).") from err
        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{HPDV2_REPO}/{filename} is not UTF-8 JSON ({err}); nothing was written.") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{HPDV2_REPO}/{filename} is not a JSON list of prompt strings; nothing was written.")
        if len(entries) != HPDV2_PER_STYLE:
            raise ValueError(f"{HPDV2_REPO}/{filename} holds {len(entries):,} prompts, expected {HPDV2_PER_STYLE}: "
                             "not the published benchmark, nothing was written.")
        prompts += entries
    return json.dumps(prompts, ensure_ascii=False, indent=0) + "\n"


FETCHERS = {"pickscore_train": fetch_pickscore_train, "pickscore_test": fetch_pickscore_test, "hpdv2": fetch_hpdv2}


def download(name: str, out_dir: str | Path = PROMPT_SET_DIR, revision: str | None = None) -> Path:
    """Fetch and verify the named set and write it to `out_dir/<file>` (e.g. pickscore_train.txt, hpdv2.json); returns
    the path. A download that fails a check writes nothing."""
    from fdfo.outputs import check_output_path, write_text

    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}.")
    folder = check_output_path("--out-dir", out_dir, folder=True)  # before the download, not after it
    path = folder / PROMPT_SETS[name].file
    if path.is_dir():
        raise ValueError(f"--out-dir {str(folder)!r} holds a folder named {path.name}; remove it or choose another "
                         "--out-dir")
    text = FETCHERS[name](revision)
    write_text(path, text)  # a failed download leaves no half file
    return path


def main(argv: list[str] | None = None) -> None:
    from fdfo.cli import guarded

    parser = argparse.ArgumentParser(prog="python -m fdfo.prompts", description="Fetch a named prompt set.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="download a prompt set into prompt_sets/")
    fetch.add_argument("name", choices=list(PROMPT_SETS))
    fetch.add_argument("--out-dir", default=str(PROMPT_SET_DIR), help="folder to write the set into")
    fetch.add_argument("--revision", default=None, help="hpdv2 only: a revision (commit, branch or tag) of the "
                       f"Hugging Face dataset {HPDV2_REPO}; default its main branch")
    args = parser.parse_args(argv)

    def run() -> None:
        existed = (Path(args.out_dir) / PROMPT_SETS[args.name].file).is_file()
        path = download(args.name, args.out_dir, args.revision)
        count = len(load_prompt_set(str(path)))
        print(f"{'replaced' if existed else 'wrote'} {path} ({count:,} prompts)")

    guarded(run)


if __name__ == "__main__":
    main()
