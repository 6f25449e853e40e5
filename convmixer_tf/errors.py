"""The kinds of failure and the exit code each gets (docs/commands.md): 0 done; 1 the job
ran and its result failed a check; 2 bad input, one line naming it; 3 a bug, with its
traceback; 128+N stopped by signal N. Library code raises them; the command lines only
turn them into exit codes."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class CheckFailed(RuntimeError):
    """The job ran and its result failed a check (exit code 1)."""


class BadInput(ValueError):
    """What the user gave (an argument, a file, a value inside one) is not usable (exit
    code 2); the message names it, where it came from, and what is allowed."""


def exit_code(err: BaseException) -> int:
    """The exit code promised for an exception raised by a job: only the user's input (and a
    file system that refuses, OSError) is exit 2; any other ValueError is a bug (exit 3)."""
    if isinstance(err, CheckFailed):
        return EXIT_FAILED
    if isinstance(err, (BadInput, OSError)):
        return EXIT_BAD_INPUT
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else EXIT_INTERNAL
    return EXIT_INTERNAL


def one_line(err, *, named: bool = False) -> str:
    """An exception's message on one line (tracebacks and wrapped messages folded), after
    its kind's name with `named`."""
    text = " ".join(str(err).split())
    if named and text:
        return f"{type(err).__name__}: {text}"
    return text or type(err).__name__
