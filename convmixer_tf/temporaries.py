"""Temporary files and folders whose names say which process writes them, so that those
of a process that was killed are recognised, and removed, by the next one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Optional

from convmixer_tf.interrupts import remove_file, removed_on_interrupt

# Temporary names: ".NAME.PID-START.RANDOM.partial[.keras]" beside the file being written
# (Keras saves only to names ending in .keras), "convmixer-PID-START-RANDOM" for folders.
# PID-START (the writer's pid and the kernel's start time of that process) tells the
# temporaries of a dead writer from a live one's, whose pid may be reused.
TEMPORARY = re.compile(
    r"\.(?P<name>.{1,200})\.(?P<pid>\d+)-(?P<start>\d+)\.[0-9a-f]{8}\.partial(\.keras)?"
)
TEMPORARY_FOLDER = re.compile(r"convmixer-(?P<pid>\d+)-(?P<start>\d+)-.+")


def writer_id() -> str:
    """PID-START of this process (see `TEMPORARY`)."""
    pid = os.getpid()
    return f"{pid}-{process_start_time(pid) or 0}"


def temporary_name(path, suffix: str = "") -> str:
    """A name beside `path` for writing it (`TEMPORARY`), unique to this process and call."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(
        folder, f".{name[:200]}.{writer_id()}.{os.urandom(4).hex()}.partial{suffix}"
    )


def _dead(match) -> bool:
    return not alive(int(match["pid"]), match["start"])


def remove_stale_temporaries(folder) -> list:
    """Removes the temporary files in `folder` (`temporary_name`) of writers that are gone
    (killed mid-write); a live writer's are left alone. Returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            match = TEMPORARY.fullmatch(entry)
            if match and _dead(match) and os.path.isfile(os.path.join(folder, entry)):
                remove_file(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def make_temporary_folder() -> str:
    """A new private temporary folder (`TEMPORARY_FOLDER`, in the system's temporary
    folder); those left by processes that were killed are removed first."""
    parent = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            path, match = os.path.join(parent, entry), TEMPORARY_FOLDER.fullmatch(entry)
            if (
                match
                and _dead(match)
                and os.path.isdir(path)
                and os.stat(path).st_uid == os.getuid()
            ):
                shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"convmixer-{writer_id()}-")


@contextlib.contextmanager
def temporary_folder():
    """A temporary folder (`make_temporary_folder`), removed on the way out and on an interrupt."""
    path = make_temporary_folder()
    try:
        with removed_on_interrupt(path):
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def environment(**values):
    """`os.environ` holds `values` for the duration (what child processes and libraries that
    read it then see); what it held before comes back."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def redirected():
    """Every temporary file of this process and its child processes (ours, TensorFlow's,
    Keras', autograph's) goes into one folder (`temporary_folder`) for the duration."""
    saved = tempfile.tempdir
    with temporary_folder() as folder, environment(TMPDIR=folder):
        tempfile.tempdir = folder
        try:
            yield folder
        finally:
            tempfile.tempdir = saved


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of process `pid` (tells a reused pid apart), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return process_start_time(pid) in (None, start)
