"""The error types the entry points report as one line instead of a traceback (see `fdfo.cli.guarded`).

They live here, apart from the CLI plumbing, so that the library modules that raise them (the training phases, the
run-folder safety code, the durable writes) do not import the command-line layer.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on for a reason the user must look at (e.g. every reward was NaN); no traceback needed."""


USER_ERRORS = (ValueError, FileNotFoundError, RunError)


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM (see fdfo/safety.py). A BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it. `hint` says how to continue (set by the training loop)."""

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(signum)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM
