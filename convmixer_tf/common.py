"""What every command-line tool and writer here shares: exit codes, a quiet start-up,
and writing output so that nothing is half-written and nothing of the user's is lost.

Exit codes (the README's table):
    0  done
    1  the job ran and its result failed a check (parity, an exported file's
       verification, a loss that stopped being finite)
    2  bad input: arguments, files, data (one line naming the problem)
    3  internal error: a bug (the traceback is printed)
    128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM); staging is removed first

Nothing here imports TensorFlow: the quiet start-up must run before it loads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from typing import Callable, Iterable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class CheckFailed(RuntimeError):
    """The job ran and its result failed a check (exit code 1)."""


class OutputExistsError(ValueError):
    """The output exists and may not be replaced (bad input: exit code 2)."""


def exit_code(err: BaseException) -> int:
    """The exit code the README promises for an exception raised by a job."""
    if isinstance(err, CheckFailed):
        return EXIT_FAILED
    if isinstance(err, (ValueError, OSError)):
        return EXIT_BAD_INPUT
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else EXIT_INTERNAL
    return EXIT_INTERNAL


def one_line(err) -> str:
    """An exception's message on one line (tracebacks and wrapped messages folded)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


# --------------------------------------------------------------------------------------
# Command-line start-up

# TensorFlow, LiteRT, XNNPACK and absl log from C++ straight to file descriptor 2, some of
# it before any Python setting can reach them; the environment handles what it can.
NATIVE_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "3", "ABSL_MIN_LOG_LEVEL": "3",
                  "GRPC_VERBOSITY": "ERROR"}


@contextlib.contextmanager
def _quiet_native_output():
    """Sends what native code prints, on fd 1 and fd 2 (C++ logs, gloo's printf), and
    Python's own stderr to /dev/null for the duration; sys.stdout keeps reaching the
    user's stdout (results, --json). The user's stderr is `_user_stream(2)`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    saved_streams = sys.stdout, sys.stderr
    stdout, owned = _user_stream(sys.stdout, 1)
    sink = open(os.devnull, "w")
    try:
        sys.stdout.flush()
        for fd in (1, 2):
            os.dup2(devnull, fd)
        sys.stdout, sys.stderr = stdout, sink
        yield
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
        sink.close()
        if owned:
            stdout.close()


def _user_stream(stream, fd):
    """A stream to what `stream` (fd `fd`) reaches now, that stays open when fd is silenced."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1), True
    except (AttributeError, OSError, ValueError):  # pytest's capture, a notebook, ...
        pass
    return stream, False


def run_command(job: Callable[[Callable[[str], None], object], int], *, quiet: bool = False,
                verbose: bool = False) -> int:
    """Runs a command-line job and turns its outcome into an exit code.

    `job(log, console)` does the work: `log` prints progress (nothing with `quiet`),
    `console` is the user's stderr. Unless `verbose`, TensorFlow's, LiteRT's and absl's
    own output is silenced for the duration. SIGTERM becomes SystemExit(143), so
    staging directories are removed on the way out. Errors print one line:
    `error: ...`; an unexpected exception prints its traceback (exit 3).
    """
    if not verbose:
        for key, value in NATIVE_LOG_ENV.items():
            os.environ.setdefault(key, value)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    console, owned = _user_stream(sys.stderr, 2)

    def log(message):
        if not quiet:
            print(message, file=console, flush=True)

    try:
        with contextlib.ExitStack() as stack:
            if not verbose:
                stack.enter_context(_quiet_native_output())
                stack.enter_context(_quiet_python_logging())
            try:
                return job(log, console)
            except BaseException as err:  # noqa: BLE001 - every outcome becomes an exit code
                code = exit_code(err)
                if code == EXIT_INTERNAL:
                    print("error: internal error (a bug; please report it with this traceback):", file=console)
                    traceback.print_exception(err, file=console)
                elif code in (EXIT_FAILED, EXIT_BAD_INPUT):
                    print(f"error: {one_line(err)}", file=console, flush=True)
                elif isinstance(err, KeyboardInterrupt):
                    print("error: interrupted", file=console, flush=True)
                return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.flush()
        if owned:
            console.close()


@contextlib.contextmanager
def _quiet_python_logging():
    import logging
    import warnings

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(level)


# --------------------------------------------------------------------------------------
# Writing files

def write_atomic(path, data, exclusive: bool = False) -> str:
    """Writes bytes or text to `path` through a temporary file beside it and a rename:
    readers see the old file or the new one, never half of it. With `exclusive`, a file
    that exists at `path` by the time of the rename is left alone (OutputExistsError)."""
    path = os.fspath(path)
    mode = "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        if exclusive:
            try:
                _rename_noreplace(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path} appeared while this run was working; it was not replaced") from None
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def write_json_atomic(path, data, exclusive: bool = False) -> str:
    return write_atomic(path, json.dumps(data, indent=2, default=jsonable) + "\n", exclusive)


def jsonable(value):
    """json.dumps default= for numpy scalars and arrays."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------
# Output folders: what --force may replace

class OutputKind:
    """What one tool writes as its output folder, and how to recognise one it wrote.

    Args:
        tool: the command, for messages.
        marker: a file the tool always writes into its output folder.
        names: every entry the tool may write there (a folder holding anything else
            holds something of the user's, and is never replaced).
        check_marker: given the marker's parsed JSON, True when it is the tool's.
    """

    def __init__(self, tool: str, marker: str, names: Callable[[], Iterable[str]],
                 check_marker: Callable[[object], bool]):
        self.tool, self.marker, self._names, self._check_marker = tool, marker, names, check_marker

    def names(self) -> set:
        return set(self._names()) | {self.marker}

    def foreign_entries(self, folder) -> Optional[list]:
        """None when `folder` is an output of this tool; else what in it is not (for messages)."""
        marker = os.path.join(folder, self.marker)
        try:
            with open(marker) as f:
                ours = self._check_marker(json.load(f))
        except (OSError, ValueError):
            ours = False
        entries = sorted(os.listdir(folder))
        # ".NAME.<...>.partial..." are this code's temporary files, left by a kill mid-write.
        foreign = [e for e in entries if e not in self.names() and not (e.startswith(".") and ".partial" in e)]
        if not entries or (ours and not foreign):
            return None  # an empty folder, or one of ours: nothing of the user's in it
        return foreign or [f"{self.marker} missing"]


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


def _inside(path, folder) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_inputs_outside(output, inputs: Sequence = ()) -> str:
    """OutputExistsError (exit 2) when `output` is, contains, or leads through a link to
    one of `inputs` (files or folders; None and tfds: names are skipped)."""
    output = os.path.abspath(os.fspath(output))
    real = _real(output)
    for given in inputs:
        if given is None or str(given).startswith("tfds:"):
            continue
        path = _real(given)
        if _inside(path, real):
            what = "is" if path == real else "contains"
            raise OutputExistsError(f"output {output} {what} the input {given}; choose another --output")
    return output


def check_replaceable(output, kind: OutputKind, force: bool, inputs: Sequence = ()) -> str:
    """Refuses (OutputExistsError, exit 2) an output that would lose something of the user's.

    An absent output is fine. An existing one needs `force`, and even then is only
    replaced when it is a folder this tool wrote (its marker, and nothing else in it).
    No output may contain, equal or lead through a link to any of `inputs`.
    Returns the absolute output path.
    """
    output = check_inputs_outside(output, inputs)
    if os.path.islink(output):
        raise OutputExistsError(f"output {output} is a symbolic link; give the folder it should be")
    if not os.path.lexists(output):
        return output
    if not os.path.isdir(output):
        raise OutputExistsError(f"output {output} exists and is a file, not an output folder of {kind.tool}; "
                                "choose another --output")
    foreign = kind.foreign_entries(output)
    if foreign is not None:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"output {output} exists and holds files {kind.tool} did not write ({shown}); "
                                "it is never replaced, even with --force: choose another --output")
    if not force:
        raise OutputExistsError(f"output {output} exists; pass --force to replace it")
    return output


# --------------------------------------------------------------------------------------
# Staging: build the output beside it, move it into place at the end

STAGING_INFIX = ".partial-"


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of process `pid` (tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = process_start_time(pid)
    return now is None or now == start


def remove_stale_staging(output) -> list:
    """Removes staging folders of `output` left by writers that are gone (a kill -9);
    a live writer's staging folder is left alone. Returns what was removed."""
    parent, name = os.path.split(os.path.abspath(os.fspath(output)))
    prefix = f".{name}{STAGING_INFIX}"
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            fields = entry[len(prefix):].split("-")
            if len(fields) < 3 or not fields[0].isdigit() or _alive(int(fields[0]), fields[1]):
                continue
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _rename_noreplace(src, dst) -> None:
    """rename(2) that fails with FileExistsError when dst exists (Linux renameat2)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "renameat2"):
        at_fdcwd, noreplace = -100, 1
        if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # other filesystems: fall back below
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", dst)
    os.rename(src, dst)  # a non-empty folder at dst still makes rename fail


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class Staging:
    """A staging folder for one output; see `staged_output`."""

    def __init__(self, output, kind: OutputKind, force: bool, inputs: Sequence = ()):
        self.output, self.kind, self.force, self.inputs = output, kind, force, tuple(inputs)
        self.path = None
        self.replaced = None  # None, "existing output" or "output written meanwhile by another run"
        self._before_commit = []
        self._created_parents = []
        self._existed = False

    def before_commit(self, callback: Callable[["Staging"], None]) -> None:
        """Calls `callback(staging)` just before the move (self.replaced is then known)."""
        self._before_commit.append(callback)

    def open(self) -> "Staging":
        self.output = check_replaceable(self.output, self.kind, self.force, self.inputs)
        self._existed = os.path.lexists(self.output)
        parent = os.path.dirname(self.output)
        try:
            self._make_parents(parent)
            remove_stale_staging(self.output)
            pid = os.getpid()
            owner = f"{pid}-{process_start_time(pid) or 0}"  # remove_stale_staging reads it back
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.output)}{STAGING_INFIX}{owner}-", dir=parent)
        except OSError as err:
            self.discard()
            raise OutputExistsError(f"cannot write output {self.output}: {err.strerror or err}") from None
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.path, 0o777 & ~mask)  # mkdtemp makes it private; the output should not be
        return self

    def _make_parents(self, parent):
        missing = []
        while parent and not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            os.mkdir(folder)
            self._created_parents.append(folder)

    def commit(self) -> None:
        if not os.path.lexists(self.output):
            self._call_before_commit()
            try:
                _rename_noreplace(self.path, self.output)
                return
            except FileExistsError:
                pass  # created since the look above: the rule below applies to it too
        # Replaced on purpose, or written meanwhile: either way only an output of this tool goes.
        check_replaceable(self.output, self.kind, True, self.inputs)
        if not self.force:
            raise OutputExistsError(f"output {self.output} appeared while this run was writing it "
                                    "(another run?); nothing was replaced: pass --force to replace it")
        self.replaced = "existing output" if self._existed else "output written meanwhile by another run"
        self._call_before_commit()
        self._replace()

    def _call_before_commit(self):
        for callback in self._before_commit:
            callback(self)

    def _replace(self):
        old = self.path + ".old"
        os.rename(self.output, old)
        try:
            _rename_noreplace(self.path, self.output)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, self.output)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.rmtree(self.path + ".old", ignore_errors=True)
        for folder in reversed(self._created_parents):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only while empty


@contextlib.contextmanager
def staged_output(output, kind: OutputKind, force: bool = False, inputs: Sequence = ()):
    """Yields a `Staging` whose `.path` is a folder beside `output`; on success it becomes
    `output`, in one rename.

    Checked before anything is written (`check_replaceable`), so an unwritable or
    forbidden output fails before any heavy work. The final move is exclusive: when
    another run created `output` meanwhile, this one fails (exit 2) unless `force`,
    and then `staging.replaced` says so. On any exception, SIGTERM included, the
    staging folder (and any parent folder made for it) is removed and an existing
    output is left as it was. Staging folders of killed runs are removed on the way.
    """
    staging = Staging(output, kind, force, inputs).open()
    try:
        yield staging
        staging.commit()
    except BaseException:
        staging.discard()
        raise


# --------------------------------------------------------------------------------------
# Command lines generated from dataclasses: every default is written once, on the field

def option(default=None, help: str = "", *, default_factory=None, **argparse_kwargs):
    """A dataclass field that is also a command-line option.

    argparse_kwargs go to `add_argument` (flag="--name" when it differs from the field
    name, group, metavar, choices, type, ...). `to_field` converts the parsed value back;
    by_hand=True leaves the option to the command (it is added there, in its own way).
    A bool field becomes `--name` (default False) or `--no-name` (default True).
    """
    import dataclasses

    meta = {"cli": dict(help=help, **argparse_kwargs)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not for on/off flags or options without one."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):  # 0 == False: test the type
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line (`error: ...`, exit 2), like
    every other bad input here."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def add_dataclass_options(parser, cls, groups: Optional[dict] = None) -> None:
    """Adds one option per `option()` field of dataclass `cls` (nested dataclass fields
    are walked), into argument group `groups[cli['group']]` when named."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_options(parser, hints[f.name], groups)
            continue
        cli = dict(f.metadata.get("cli") or {})
        if not cli or cli.pop("by_hand", False):
            continue
        cli.pop("to_field", None)
        target = (groups or {}).get(cli.pop("group", None), parser)
        flag = cli.pop("flag", "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints[f.name] is bool and "action" not in cli:
            cli["action"] = "store_false" if default else "store_true"
        elif "type" not in cli and "action" not in cli:
            cli["type"] = _scalar_type(hints[f.name])
        if cli.get("action") != "store_false":
            cli.setdefault("default", default)
        target.add_argument(flag, dest=f.name, **cli)


def _scalar_type(hint):
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is typing.Union else hint


def dataclass_from_args(cls, args, **overrides):
    """The dataclass `cls` filled from parsed `args` (its `option()` fields) and `overrides`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = dataclass_from_args(hints[f.name], args)
        elif "cli" in f.metadata and hasattr(args, f.name):
            value = getattr(args, f.name)
            to_field = f.metadata["cli"].get("to_field")
            values[f.name] = to_field(value) if to_field else value
    return cls(**values)


def floats(count: int):
    """An argparse type: `count` comma-separated numbers, as a tuple."""
    def parse(text):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values

    parse.__name__ = f"{count} numbers"
    return parse


def positive(kind=int):
    """An argparse type: a number > 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse
