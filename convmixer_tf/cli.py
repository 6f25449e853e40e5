"""What the command lines share at start-up: exit codes (`convmixer_tf.errors`),
signals, a quiet console, and argparse with one-line errors. Nothing here imports
TensorFlow: the start-up is done before it loads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import traceback
import warnings
from typing import Callable

from convmixer_tf import errors, interrupts, temporaries
from convmixer_tf.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, exit_code, one_line

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A command whose reader closed its stdout (`predict ... | head -1`) stops at once and
# quietly, with the code a shell reports for a process that SIGPIPE ended.
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE
# TensorFlow, LiteRT, XNNPACK and absl log from C++ straight to file descriptor 2, some of
# it before any Python setting can reach them; the environment handles what it can.
NATIVE_LOG_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "GLOG_minloglevel": "3",
    "ABSL_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
}


def run_command(
    job: Callable[[Callable[[str], None], object], int],
    *,
    quiet: bool = False,
    verbose: bool = False,
) -> int:
    """Runs a command-line job and turns its outcome into an exit code.

    `job(log, console)` does the work: `log` prints progress (nothing with `quiet`),
    `console` is the user's stderr. Unless `verbose`, TensorFlow's, LiteRT's and absl's
    own output is silenced for the duration. Errors print one line, `error: ...`; an
    unexpected exception prints its traceback (exit 3).

    SIGINT and SIGTERM stop the process at once, whatever it is doing: what this run was
    staging is removed and it exits 128 + the signal. Nothing is raised into the job,
    so no library code can swallow the signal and go on to report success. Results go to
    sys.stdout however they are printed (`_results`: a closed or full stdout ends the job).
    """
    if not verbose:
        for key, value in NATIVE_LOG_ENV.items():
            os.environ.setdefault(key, value)
    _fill_closed_std_fds()
    console, owned = _user_stream(sys.stderr, 2, _UserStream)

    def interrupted(signum, frame):
        if interrupts.interrupt(signum):  # False: the output is being moved into place, or is
            with contextlib.suppress(Exception):  # a stdout that fails says nothing more
                sys.stdout.flush()
            print("error: interrupted", file=console, flush=True)
            os._exit(128 + signum)

    interrupts.begin_command()
    previous = {signum: signal.signal(signum, interrupted) for signum in SIGNALS}
    try:
        with (
            temporaries.redirected(),
            _results(),
            _quiet() if not verbose else contextlib.nullcontext(),
        ):
            return job(
                lambda message: None if quiet else print(message, file=console, flush=True), console
            )
    except StdoutClosed:
        return EXIT_STDOUT_CLOSED
    except BaseException as err:  # noqa: BLE001 - every outcome becomes an exit code
        return _reported(err, console)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        console.flush()
        if owned:
            console.close()


def run_parsed(parser: argparse.ArgumentParser, argv, job) -> int:
    """A command line's `main`: `run_command` of `job(args, log, console)`, with `args`
    parsed from `argv` (None: sys.argv), as quiet and as verbose as they say."""
    args = parser.parse_args(argv)
    return run_command(
        lambda log, console: job(args, log, console),
        quiet=args.quiet,
        verbose=getattr(args, "verbose", False),  # a command without --verbose: never
    )


def _reported(err: BaseException, console) -> int:
    """Prints what ended a job (one line; a bug's traceback) and returns its exit code."""
    code = exit_code(err)
    if code == EXIT_INTERNAL:
        print("error: internal error (a bug; please report it with this traceback):", file=console)
        traceback.print_exception(err, file=console)
    elif code in (EXIT_FAILED, EXIT_BAD_INPUT):
        line = one_line(err)
        print(f"error: {line if line.isprintable() else escaped(line)}", file=console, flush=True)
    return code


class StdoutClosed(Exception):
    """The reader of stdout went away: `run_command` ends the command quietly, with
    EXIT_STDOUT_CLOSED."""


def _to_devnull(stream) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a file (pytest's capture, a notebook)
        pass
    finally:
        os.close(devnull)


def _fill_closed_std_fds() -> None:
    """Gives a stdin, stdout or stderr closed before the start (`<&-`, `>&-`, `2>&-`)
    something to be, so that no file opened later takes its number (native libraries
    write their logs to fd 2, whatever it has become): stdin and stderr os.devnull (a
    closed stderr is silence), stdout a pipe that no one reads (a closed stdout is a
    reader already gone)."""
    closed = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    for _ in closed:
        os.open(os.devnull, os.O_RDWR)  # the lowest free number: each closed one in turn
    if 1 in closed:
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        os.close(read)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if fd in closed:
            setattr(sys, name, open(fd, "w", closefd=False))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _UserStream(io.TextIOWrapper):
    """A copy of the user's stderr, or of stdout (`_Results`), that stays open while
    `_quiet` silences its fd. A write or flush that fails (the fd closed before the start, a
    full disk, a reader gone) points it at os.devnull, so that nothing still buffered fails
    again: on stderr the command goes on, silent there (the exit code tells)."""

    results = False
    failed = False

    def write(self, text) -> int:
        try:
            return super().write(text)
        except OSError as err:
            self._failed(err)
            return len(text)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as err:
            self._failed(err)

    def _failed(self, err: OSError) -> None:
        _to_devnull(self)
        self.failed = True
        if self.results and isinstance(err, BrokenPipeError):
            raise StdoutClosed() from None
        if self.results:
            raise errors.BadInput(f"cannot write the results to stdout: {err.strerror}") from None


class _Results(_UserStream):
    """stdout, for the results: a write that fails ends the command, StdoutClosed when the
    reader has gone, BadInput naming stdout otherwise."""

    results = True


@contextlib.contextmanager
def _results():
    """sys.stdout is `_Results` for the duration (where it is the user's fd 1), flushed at
    the end: where the reader of stdout has gone (a pipe closed, or stdout closed before
    the start) the job ends there, quietly (EXIT_STDOUT_CLOSED); where it refuses a write
    otherwise (a full disk) it is exit 2, one line. After a failure fd 1 itself points at
    os.devnull too: Python's own flush at exit would fail again, and exit 120."""
    saved = sys.stdout
    stream, owned = _user_stream(saved, 1, _Results)
    sys.stdout = stream
    try:
        yield
        stream.flush()
    finally:
        sys.stdout = saved
        if getattr(stream, "failed", False):
            _to_devnull(saved)
        if owned:
            with contextlib.suppress(Exception):  # the job's own error is the one to report
                stream.close()


# How `escaped` writes the backslash and the usual control characters (as `ls -b` does).
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escaped(text) -> str:
    """`text` made safe for one terminal line, as `ls -b` shows a file name: the backslash and
    each character that is not printable (a control, format or separator character; a
    byte that was not UTF-8, which a name from the file system holds as a surrogate) as an
    escape (`\\n`, `\\x1b`, `\\u202e`, `\\xff`), so that no name can forge a line, move the
    cursor or reorder what follows. Printable text without a backslash comes back as it is.

    Example:
        >>> escaped("photos/a\\nb\\x1b[2J.png")
        'photos/a\\\\nb\\\\x1b[2J.png'
    """
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else _escape(c)) for c in text)


def _escape(character: str) -> str:
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return ascii(character)[1:-1]  # \xhh, \uhhhh or \Uhhhhhhhh: Python's own escape


@contextlib.contextmanager
def child(command, **popen):
    """A child process (`subprocess.Popen(command, **popen)`) that ends with this command:
    killed and reaped on SIGINT / SIGTERM, and when the block fails."""
    process = subprocess.Popen(command, **popen)
    with process, interrupts.on_interrupt(lambda: (process.kill(), process.wait(5))):
        try:
            yield process
        except BaseException:
            process.kill()
            raise


def run_child(command, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` through `child`."""
    with child(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    ) as process:
        out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def exit(code: int):
    """Ends a command-line process with `code`; a signal during the interpreter's own
    shutdown (the work is done, the output in place) no longer changes it."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


@contextlib.contextmanager
def _quiet():
    """Sends what native code prints on fd 1 and fd 2 (C++ logs, gloo's printf), Python's
    own stderr, its warnings and log records below errors to /dev/null for the duration;
    sys.stdout (`_results`, a copy of fd 1) keeps reaching the user's stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    saved_stderr, level = sys.stderr, logging.root.manager.disable
    sink = open(os.devnull, "w")
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        sys.stderr = sink
        logging.disable(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr = saved_stderr
        logging.disable(level)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        sink.close()


def _user_stream(stream, fd, kind):
    """A `kind` stream to what `stream` (fd `fd`) reaches now, line-buffered, in its
    encoding, that stays open when fd is silenced; `stream` itself (and False: not ours to
    close) where it is not fd `fd` (pytest's capture, a notebook)."""
    try:
        if stream.fileno() == fd:
            raw = io.BufferedWriter(io.FileIO(os.dup(fd), "w"))
            return kind(raw, stream.encoding, stream.errors, line_buffering=True), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, but not for on/off flags or options without one; keeps the epilog's lines."""

    def _get_help_string(self, action):
        if action.default in (None, [], argparse.SUPPRESS) or action.nargs == 0:
            return action.help
        if isinstance(action.default, list):
            return f"{action.help} (default: {' '.join(action.default)})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line (`error: ...`, exit 2), like
    every other bad input here."""

    def __init__(self, *, description: str = "", **kwargs):
        # The epilogs keep their own lines; a one-paragraph description is wrapped.
        super().__init__(
            description=textwrap.fill(description, 80), formatter_class=HelpFormatter, **kwargs
        )

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")

    def add_console_options(self, group=None, noisy: str = "TensorFlow, LiteRT and absl"):
        """--json, --quiet and --verbose, the same in every command."""
        target = group or self
        target.add_argument(
            "--json", action="store_true", help="print the result as JSON on stdout"
        )
        target.add_argument("--quiet", action="store_true", help="no progress messages")
        target.add_argument("--verbose", action="store_true", help=f"let {noisy} print their logs")


def floats(count: int, *, positive: bool = False):
    """An argparse type: `count` comma-separated finite numbers (each > 0 with `positive`), as a tuple."""
    wanted = f"{count} comma-separated finite numbers" + (" > 0" if positive else "")

    def parse(text):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        finite = len(values) == count and all(math.isfinite(v) for v in values)
        if not finite or (positive and min(values) <= 0):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return values

    parse.__name__ = f"{count} numbers"
    return parse


def positive(kind=int, *, most=None):
    """An argparse type: a finite number > 0 (and at most `most`)."""
    bound = f" and at most {most}" if most is not None else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be a positive number{bound}, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def fraction(text):
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value
