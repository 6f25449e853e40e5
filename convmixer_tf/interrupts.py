"""What a SIGINT / SIGTERM undoes before the process stops, and the moment that must not
be cut short: the command lines' handler calls `interrupt`; code that starts something to
undo (a child process, a file or folder being written) registers it for the duration.

Imported first by the package: in an interpreter started to run a command line, SIGINT
and SIGTERM stop it from then on (`stop_now`), before the command's start-up
(`cli.run_command`) sets a handler of its own: its imports take most of a second, during
which Python would print a KeyboardInterrupt traceback (SIGINT) or die without a word
(SIGTERM)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from typing import Callable

# Interrupts: what to undo, and the moment that must not be cut short
_undo = []  # callables, newest last: what a signal that stops this process undoes first
_state = {"moving": False, "pending": None, "done": False}


@contextlib.contextmanager
def on_interrupt(undo: Callable[[], object]):
    """Registers `undo` (a child process to kill, a path to remove) for `interrupt` while
    the block runs."""
    _undo.append(undo)
    try:
        yield
    finally:
        _undo.remove(undo)


def removed_on_interrupt(path):
    """Registers `path` (a staging folder, a temporary file or folder) for `interrupt`."""

    def remove(path=os.fspath(path)):
        for _ in range(3):  # a writer thread may add a file while the folder goes
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_file(path)
            if not os.path.lexists(path):
                break

    return on_interrupt(remove)


def interrupt(signum) -> bool:
    """Undoes what this process was doing (newest first) and returns True (stop now).
    During the final move it only remembers `signum` (re-sent once the move is done), and
    after it lets the signal go: the command's work is done. Both return False (finish)."""
    if _state["moving"] or _state["done"]:
        _state["pending"] = signum if _state["moving"] else None
        return False
    for undo in reversed(_undo):
        with contextlib.suppress(Exception):
            undo()
    return True


def begin_command() -> None:
    """A command line starts: nothing of it is in place yet."""
    _state.update(moving=False, pending=None, done=False)


@contextlib.contextmanager
def final_move():
    _state["moving"] = True
    try:
        yield
        _state["done"] = True
    finally:
        _state["moving"] = False
        pending, _state["pending"] = _state["pending"], None
        if pending is not None:
            signal.raise_signal(pending)


def remove_file(path) -> None:
    """os.remove, where a file already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def stop_now(signum, frame) -> None:
    """A command's handler of SIGINT and SIGTERM before its start-up sets its own (and after
    it gives it back): what `interrupt` undoes, then `error: interrupted` and 128 + the
    signal; after the final move, nothing (the work is done)."""
    if interrupt(signum):
        with contextlib.suppress(OSError):  # stderr closed: the exit code tells
            os.write(2, b"error: interrupted\n")
        os._exit(128 + signum)


def run_as_a_command() -> bool:
    """Whether this interpreter was started to run a module of this project (`python -m
    convmixer_tf.predict`, `python -m weights_converter`) or a `convmixer-*` script: not
    a notebook, a test run, a program of the user's or an export's worker process."""
    argv, started = sys.argv, getattr(sys, "orig_argv", [])
    if argv[:1] == ["-m"]:  # python -m NAME ARGS: sys.argv[0] is "-m" while NAME is found
        module = started[-len(argv)].removeprefix("-m")
        return module.split(".")[0] in ("convmixer_tf", "weights_converter")
    return len(started) > 1 and os.path.basename(started[1]).startswith("convmixer-")


if run_as_a_command():
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, stop_now)
