"""`train.py --config runs/<id>/config.json`: start from the settings a run recorded, to replay or share it.

The file's settings become command-line flags in the place of `--config PATH`, so they pass through exactly the
checks of typed flags, and a flag given after `--config` overrides the file (one given before it is overridden).
Not taken from the file: what config.json records about the run rather than settings for a new one: `geometry`
(derived from the settings and the GPU count), `run_dir` (where that run lived: a replay starts a new folder unless
--run-dir is passed, and `--run-dir` of that run resumes it) and `resume_from` (a checkpoint of that run's history).
A key that is no setting of this version (a typo, a setting from another version) is refused, all of them in one
message, as is a value of the wrong type (each named with its key, the file and the flag). Values are passed as
`--flag=value`, so that a string starting with `--` stays a value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
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
        if not fits(hint, value):
            wrong.append(f"{name} is {json.dumps(value)}, not {describe(hint)} ({option})")
        elif hint is bool:  # a flag pair: --x / --no-x
            head, dot, last = option[2:].rpartition(".")
            flags.append(option if value else f"--{head}{dot}no-{last}")
        elif isinstance(value, list):  # a tuple setting takes its values as separate arguments
            if any(isinstance(v, str) and v.startswith("-") for v in value):
                wrong.append(f"{name} is {json.dumps(value)}: a value of {option} cannot start with '-'")
            else:
                flags += [option, *map(_text, value)]
        else:
            flags.append(f"{option}={_text(value)}")  # one argument: a value such as "--x" is not taken for a flag


def _text(value) -> str:
    return "None" if value is None else repr(value) if isinstance(value, float) else str(value)


def fits(hint, value) -> bool:
    """Whether the JSON `value` is a value of a setting of type `hint` (bool, int, float, str, None, a Literal, a
    union of them, a fixed-length tuple or a tuple[X, ...]); numbers must be finite, and a bool is no number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(arg, value) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(args[0], v) for v in value)
        return len(value) == len(args) and all(fits(arg, v) for arg, v in zip(args, value))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return {bool: isinstance(value, bool), str: isinstance(value, str), type(None): value is None}.get(hint, False)


def describe(hint) -> str:
    """What `fits` accepts, in words: "a whole number", "null or a number", "a list of 2 numbers", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {PLURAL.get(args[0], 'values')}"
        return f"a list of {len(args)} {PLURAL.get(args[0], 'values')}"
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


PLURAL = {int: "whole numbers", float: "finite numbers", str: "strings"}
