"""`train.py --config runs/<id>/config.json`: start from the settings a run recorded, to replay or share it.

The file's settings become command-line flags in the place of `--config PATH`, so they pass through exactly the
checks of typed flags, and a flag given after `--config` overrides the file (one given before it is overridden).
Not taken from the file: what config.json records about the run rather than settings for a new one: `geometry`
(derived from the settings and the GPU count), `run_dir` (where that run lived: a replay starts a new folder unless
--run-dir is passed, and `--run-dir` of that run resumes it) and `resume_from` (a checkpoint of that run's history).
A key that is no setting of this version (a typo, a setting from another version) is refused, all of them in one
message, as is a value of the wrong kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

from fdfo.config import Config
from fdfo.prompts import replayed_path

RECORDED = ("geometry", "run_dir", "resume_from")  # in config.json, but not settings to carry over


def expand_config(argv: list[str]) -> list[str]:
    """`argv` with each `--config PATH` (or `--config=PATH`) replaced by the flags of PATH's settings."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError("--config needs a file: --config runs/<run>/config.json")
                path, i = argv[i + 1], i + 2
            else:
                path, i = arg.split("=", 1)[1], i + 1
            out += config_flags(Path(path))
        else:
            out.append(arg)
            i += 1
    return out


def config_flags(path: Path) -> list[str]:
    """The flags that set every setting recorded in `path` (a run's config.json). ValueError for a missing or
    unreadable file, unknown keys, or values of the wrong kind."""
    flag = f"--config {path}"
    if not path.is_file():
        raise ValueError(f"{flag}: no such file; pass the config.json of a run (runs/<run>/config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{flag}: cannot be read as JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag}: holds a JSON {type(data).__name__}, not an object of settings")
    if isinstance(data.get("prompt_file"), str):  # recorded relative to the repository: this clone's file
        data["prompt_file"] = replayed_path(data["prompt_file"])
    flags, unknown, wrong = [], [], []
    _walk(Config, {k: v for k, v in data.items() if k not in RECORDED}, "", flags, unknown, wrong)
    if unknown:
        raise ValueError(f"{flag}: unknown setting(s) {', '.join(unknown)}; this version's settings are listed by "
                         f"`python train.py --help` (config.json keys use _ where flags use -)")
    if wrong:
        raise ValueError(f"{flag}: {'; '.join(wrong)}")
    return flags


def _walk(cls, data: dict, prefix: str, flags: list[str], unknown: list[str], wrong: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = prefix + key
        if key not in fields:
            unknown.append(name)
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                wrong.append(f"{name} is {json.dumps(value)}, not an object of {hint.__name__} settings")
            else:
                _walk(hint, value, f"{name}.", flags, unknown, wrong)
            continue
        option = "--" + name.replace("_", "-")
        if hint is bool:  # a flag pair: --x / --no-x
            if not isinstance(value, bool):
                wrong.append(f"{name} is {json.dumps(value)}, not true or false")
                continue
            head, dot, last = option[2:].rpartition(".")
            flags.append(option if value else f"--{head}{dot}no-{last}")
            continue
        values = value if isinstance(value, list) else [value]
        if not all(_scalar(v) for v in values) or (isinstance(value, list) and typing.get_origin(hint) is not tuple):
            wrong.append(f"{name} is {json.dumps(value)}, not a value of {option}")
            continue
        flags += [option, *("None" if v is None else repr(v) if isinstance(v, float) else str(v) for v in values)]


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))
