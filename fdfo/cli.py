"""Shared entry-point plumbing: presets chosen with --preset before tyro parses the rest, and user errors printed
as one line with a non-zero exit instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class RunError(RuntimeError):
    """A run cannot go on for a reason the user must look at (e.g. every reward was NaN); no traceback needed."""


USER_ERRORS = (ValueError, FileNotFoundError, RunError)


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
    return tyro.cli(config_type, default=presets[known.preset](), args=rest, description=description)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def guarded(fn: Callable[[], object]) -> None:
    """Run `fn`; a user error becomes `error: <message>` on stderr and exit status 2."""
    try:
        fn()
    except USER_ERRORS as e:
        fail(str(e))


def run_main(fn: Callable[[T], object], cfg: T) -> None:
    """An entry point's body: `fn(cfg)` with user errors reported by `guarded`, the process group always closed."""
    from fdfo import distributed

    def run() -> None:
        try:
            fn(cfg)
        finally:
            distributed.shutdown()

    guarded(run)
