"""Writing outputs so that nothing is half-written and nothing of the user's is lost.

- `write_atomic`: a file appears whole or not at all, with the umask's mode.
- `Output`: what one command writes (a marker file and the patterns of every file), so
  `--force` tells, all the way down, an earlier output of that command from anything else.
- `staged`: an output folder is built beside its place and moved there by one rename at
  the end; rename(2) never replaces a non-empty folder, so of two racing runs one wins.
- `interrupt`: what the command lines' SIGINT / SIGTERM handler calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import shutil
import signal
import tempfile
from typing import Callable, Optional, Sequence, Tuple


class OutputExistsError(ValueError):
    """The output exists and may not be replaced (bad input: exit code 2)."""


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
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _remove(path)
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
def _final_move():
    _state["moving"] = True
    try:
        yield
        _state["done"] = True
    finally:
        _state["moving"] = False
        pending, _state["pending"] = _state["pending"], None
        if pending is not None:
            signal.raise_signal(pending)


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def write_atomic(path, data, exclusive: bool = False) -> str:
    """Writes bytes or text to `path` through a temporary file beside it: readers see the
    old file or the new one, never half of it. With `exclusive`, a file that exists at
    `path` by then is left alone (OutputExistsError): link(2) never replaces a file."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name[:200]}.{os.getpid()}.{os.urandom(4).hex()}.partial")
    with removed_on_interrupt(tmp):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides the mode
            with os.fdopen(fd, "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w") as f:
                f.write(data)
            try:
                os.link(tmp, path) if exclusive else os.replace(tmp, path)
            except FileExistsError:  # only link(2) raises it
                raise OutputExistsError(f"{path} appeared while this run was working; it was not replaced") from None
        finally:
            _remove(tmp)
    return path


def write_json_atomic(path, data, exclusive: bool = False) -> str:
    return write_atomic(path, json.dumps(data, indent=2, default=jsonable) + "\n", exclusive)


def jsonable(value):  # json.dumps' default= for numpy scalars and arrays
    return value.tolist() if hasattr(value, "tolist") else str(value)


@contextlib.contextmanager
def temporary_folder(prefix: str = "convmixer-"):
    """A temporary folder, removed on the way out and on an interrupt."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        with removed_on_interrupt(path):
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Output:
    """What one command writes as its output folder, and how to recognise one it wrote.

    Args:
        tool: the command, for messages.
        marker: a file the command always writes there.
        is_ours: given the marker's parsed JSON, True when it is the command's.
        files: glob patterns ("saved_model/variables/variables.*") of every file the
            command may write there, relative and "/"-separated; "dir/" for a folder
            that may stay empty. Anything else in the tree is the user's.
    """

    tool: str
    marker: str
    is_ours: Callable[[object], bool]
    files: Tuple[str, ...]

    def _folder_ok(self, rel) -> bool:
        for pattern in self.files:
            parts = pattern.rstrip("/").split("/")
            depth = len(parts) if pattern.endswith("/") else len(parts) - 1  # the folders a pattern implies
            if any(fnmatch.fnmatchcase(rel, "/".join(parts[:k])) for k in range(1, depth + 1)):
                return True
        return False

    def foreign(self, root) -> list:
        """What under `root` this command did not write (relative paths): files, links, and
        folders it does not make that hold nothing else. ".NAME...partial" files are
        write_atomic's, left by a kill mid-write."""
        found = []
        for folder, dirs, files in os.walk(root):
            rel_folder = os.path.relpath(folder, root).replace(os.sep, "/")
            prefix = "" if rel_folder == "." else rel_folder + "/"
            if prefix and not dirs and not files and not self._folder_ok(rel_folder):
                found.append(rel_folder)
            for name in dirs + files:
                path, rel = os.path.join(folder, name), prefix + name
                ours_temporary = name.startswith(".") and ".partial" in name
                if os.path.islink(path) or (name in files and not ours_temporary and not (
                        os.path.isfile(path) and any(fnmatch.fnmatchcase(rel, p) for p in self.files))):
                    found.append(rel)
        return sorted(found)

    def earlier_output(self, folder) -> Optional[list]:
        """None when `folder` is empty or an output of this command; else what in it is not."""
        try:
            with open(os.path.join(folder, self.marker)) as f:
                ours = self.is_ours(json.load(f))
        except (OSError, ValueError):
            ours = False
        foreign = self.foreign(folder)
        return None if not os.listdir(folder) or (ours and not foreign) else foreign or [f"{self.marker} missing"]


def check_inputs_outside(output, inputs: Sequence = ()) -> str:
    """OutputExistsError (exit 2) when `output` is, contains, or leads through a link to
    one of `inputs` (files or folders; None, tfds: and hub names are skipped)."""
    output = os.path.abspath(os.fspath(output))
    real = os.path.realpath(output)
    for given in inputs:
        if given is None or str(given).startswith(("tfds:", "hf-hub:", "hf://")):
            continue
        path = os.path.realpath(os.fspath(given))
        if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
            what = "is" if path == real else "contains"
            raise OutputExistsError(f"output {output} {what} the input {given}; choose another --output")
    return output


def check_replaceable(output, kind: Output, force: bool, inputs: Sequence = ()) -> str:
    """Refuses (OutputExistsError, exit 2) an output that would lose something of the user's.

    An absent output is fine. An existing one needs `force`, and even then is only
    replaced when it is a folder this command wrote (its marker, and nothing anywhere in
    it that the command does not write). No output may contain, equal or lead through a
    link to any of `inputs`. Returns the absolute output path.
    """
    output = check_inputs_outside(output, inputs)
    if os.path.islink(output):
        raise OutputExistsError(f"output {output} is a symbolic link; give the folder it should be")
    if not os.path.lexists(output):
        return output
    if not os.path.isdir(output):
        raise OutputExistsError(f"output {output} exists and is a file, not an output folder of {kind.tool}; "
                                "choose another --output")
    foreign = kind.earlier_output(output)
    if foreign is not None:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"output {output} exists and holds files {kind.tool} did not write ({shown}); "
                                "it is never replaced, even with --force: choose another --output")
    if not force:
        raise OutputExistsError(f"output {output} exists; pass --force to replace it")
    return output


def check_file(path, is_ours: Callable[[object], bool], inputs: Sequence = (), option: str = "--output") -> bool:
    """A file output may be new, or an earlier one of this command (`is_ours` of its JSON),
    which is replaced; anything else is refused (exit 2). True when it is an earlier one."""
    check_inputs_outside(path, inputs)
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise OutputExistsError(f"cannot write {option} {path}: {parent} is not a writable folder")
        return False
    try:
        with open(path) as f:
            ours = is_ours(json.load(f)) and not os.path.islink(path)
    except (OSError, ValueError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise OutputExistsError(f"{option} {path} exists and is not an earlier output of this command; "
                                f"it is not replaced: choose another {option}")
    return True


STAGING_INFIX = ".partial-"
_NAME_KEPT = 120  # of the output's name in its staging folder's (file names stop at 255 bytes)


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
        pass
    return process_start_time(pid) in (None, start)


def _staging_prefix(output) -> Tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(os.fspath(output)))
    return parent, f".{name[:_NAME_KEPT]}{STAGING_INFIX}"


def remove_stale_staging(output) -> list:
    """Removes staging folders of `output` left by writers that are gone (a kill -9); a
    live writer's is left alone. Returns what was removed."""
    parent, prefix = _staging_prefix(output)
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            fields = entry[len(prefix):].split("-")
            if entry.startswith(prefix) and len(fields) >= 3 and fields[0].isdigit() and not _alive(
                    int(fields[0]), fields[1]):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                removed.append(entry)
    return removed


def _move(src, dst) -> None:
    """rename(2), which fails (FileExistsError) where `dst` is a non-empty folder or a file."""
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", dst) from None
        raise


def _make_parents(parent) -> list:
    """Creates the missing folders above an output; returns them (removed again on failure)."""
    missing = []
    while parent and not os.path.isdir(parent):
        if os.path.lexists(parent):
            reason = "not a folder" if os.path.exists(parent) else \
                "a symbolic link that leads nowhere (a loop or a missing target)"
            raise OSError(errno.ENOTDIR, reason, parent)
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        os.mkdir(folder)
    return missing


class Staging:
    """A staging folder for one output; see `staged`. `on_commit(staging)`, when set, is
    called just before the final move, when `replaced` is known: None, "existing output"
    or "output written meanwhile by another run"."""

    def __init__(self, output, kind: Output, force: bool, inputs: Sequence = ()):
        self.output, self.kind, self.force, self.inputs = output, kind, force, tuple(inputs)
        self.path, self.replaced, self.on_commit = None, None, None
        self._created, self._existed, self._registration = [], False, contextlib.ExitStack()

    def open(self) -> "Staging":
        self.output = check_replaceable(self.output, self.kind, self.force, self.inputs)
        self._existed = os.path.lexists(self.output)
        parent, prefix = _staging_prefix(self.output)
        try:
            self._created = _make_parents(parent)
            remove_stale_staging(self.output)
            pid = os.getpid()
            self.path = tempfile.mkdtemp(prefix=f"{prefix}{pid}-{process_start_time(pid) or 0}-", dir=parent)
        except OSError as err:
            self.discard()
            where = f": {err.filename}" if err.filename else ""
            raise OutputExistsError(f"cannot write output {self.output}: {err.strerror or err}{where}") from None
        self._registration.enter_context(removed_on_interrupt(self.path))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.path, 0o777 & ~mask)  # mkdtemp makes it private; the output should not be
        return self

    def commit(self) -> None:
        with _final_move():
            if not os.path.lexists(self.output):
                with contextlib.suppress(FileExistsError):  # created since: the rule below applies to it too
                    self.on_commit and self.on_commit(self)
                    _move(self.path, self.output)
                    return self._registration.close()
            # Replaced on purpose, or written meanwhile: either way only an output of this command goes.
            check_replaceable(self.output, self.kind, True, self.inputs)
            if not self.force:
                raise OutputExistsError(f"output {self.output} appeared while this run was writing it "
                                        "(another run?); nothing was replaced: pass --force to replace it")
            self.replaced = "existing output" if self._existed else "output written meanwhile by another run"
            self.on_commit and self.on_commit(self)
            aside = self.path + ".old"
            os.rename(self.output, aside)
            try:
                _move(self.path, self.output)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(aside, self.output)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            self._registration.close()

    def discard(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        for folder in self._created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only while empty
        self._registration.close()


@contextlib.contextmanager
def staged(output, kind: Output, force: bool = False, inputs: Sequence = ()):
    """Yields a `Staging` whose `.path` is a folder beside `output`; on success it becomes
    `output`, in one rename.

    Checked before anything is written (`check_replaceable`), so an unwritable or
    forbidden output fails before any heavy work. The final move is exclusive: when
    another run created `output` meanwhile, this one fails (exit 2) unless `force`, and
    then `staging.replaced` says so. On any exception, and on SIGINT / SIGTERM in a
    command line, the staging folder (and any parent folder made for it) is removed and
    an existing output is left as it was. Staging folders of killed runs are removed.
    """
    staging = Staging(output, kind, force, inputs).open()
    try:
        yield staging
        staging.commit()
    except BaseException:
        staging.discard()
        raise
