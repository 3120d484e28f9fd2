"""Shared entry-point plumbing: presets chosen with --preset before tyro parses the rest, and user errors printed
as one line with a non-zero exit instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

from fdfo.errors import USER_ERRORS, Interrupted

T = TypeVar("T")


def check_device(flag: str, value: str | None) -> None:
    """Raise ValueError unless `value` names a device this machine has (None: the automatic choice)."""
    import torch

    if value is None:
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"{flag} {value!r}: device type {dev.type!r} is not supported; use cpu, cuda or "
                         f"cuda:<index>") from None
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {value!r}: CUDA is not available on this machine; use {flag} cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{flag} {value!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def parse_with_preset(config_type: type[T], presets: dict[str, Callable[[], T]], argv: list[str] | None,
                      description: str | None = None) -> T:
    """Pick the default instance named by --preset, then let tyro apply the remaining flags on top of it."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=next(iter(presets)))
    known, rest = pre.parse_known_args(argv)
    if known.preset not in presets:
        fail(f"unknown preset {known.preset!r}; choose one of: {', '.join(presets)}")
    check_switches(config_type, rest)
    return tyro.cli(config_type, default=presets[known.preset](), args=rest, description=description)


def switches(config_type: type, prefix: str = "") -> dict[str, str]:
    """{flag: its pair} for every on/off setting of a config dataclass, as tyro spells them: `--log-wandb` and
    `--no-log-wandb` for a top-level bool, `--train.compile` and `--train.no-compile` for a nested one."""
    import dataclasses
    import typing

    found = {}
    for name, hint in typing.get_type_hints(config_type).items():
        flag = name.replace("_", "-")
        if hint is bool:
            on, off = f"--{prefix}{flag}", f"--{prefix}no-{flag}"
            found |= {on: f"{on} / {off}", off: f"{on} / {off}"}
        elif dataclasses.is_dataclass(hint):
            found |= switches(hint, f"{prefix}{flag}.")
    return found


def check_switches(config_type: type, argv: list[str]) -> None:
    """An on/off flag takes no value: `--log-wandb maybe` (or `--log-wandb=true`) gets one line naming the flag and
    the value, instead of tyro's "Unrecognized options: maybe" that names neither the flag nor the fix."""
    pairs = switches(config_type)
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag not in pairs:
            continue
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        elif not eq:
            continue
        fail(f"{flag} {value!r}: {flag} is an on/off switch and takes no value; write {pairs[flag]} alone")


def tool_main(config_type: type[T], fn: Callable[[T], object], prog: str, description: str | None,
              argv: list[str] | None = None) -> None:
    """A side tool's entry point: tyro parses `argv` into `config_type`, then `fn(cfg)` runs under `guarded` (user
    errors as one line, exit 2)."""
    import tyro

    cfg = tyro.cli(config_type, args=argv, prog=prog, description=description)
    guarded(lambda: fn(cfg))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def guarded(fn: Callable[[], object]) -> None:
    """Run `fn`; a user error becomes `error: <message>` on stderr and exit status 2, as does a lost connection to
    another process of a torchrun launch (fdfo.distributed.lost_peer); Ctrl-C / SIGTERM one `interrupted` line and
    130 / 143."""
    import signal

    try:
        fn()
    except USER_ERRORS as e:
        fail(str(e))
    except RuntimeError as e:  # another process of a torchrun launch went away: one line, not a traceback
        from fdfo.distributed import lost_peer

        if (line := lost_peer(e)) is None:
            raise
        fail(line)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        hint = getattr(e, "hint", "")
        print(f"interrupted by {signal.Signals(signum).name}{'; ' + hint if hint else ''}", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum) from None


def run_main(fn: Callable[[T], object], cfg: T) -> None:
    """An entry point's body: `fn(cfg)` with user errors reported by `guarded`, the process group always closed."""
    from fdfo import distributed

    def run() -> None:
        try:
            fn(cfg)
        finally:
            distributed.shutdown()

    guarded(run)
