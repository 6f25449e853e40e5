"""An output folder built beside its place and moved there by one rename at the end: a
failure at any moment leaves no half-written output, and rename(2) never replaces a
non-empty folder, so of two racing runs one wins. Just before, the folder gets its RECORD.
Staging folders of runs that were killed are removed by the next run on the same output."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Sequence, Tuple

from convmixer_tf.interrupts import final_move, removed_on_interrupt
from convmixer_tf.outputs import (
    OutputExistsError,
    check_replaceable,
    follow_umask,
    umask,
    write_record,
)
from convmixer_tf.temporaries import alive, writer_id

STAGING_INFIX = ".partial-"
_NAME_KEPT = 120  # of the output's name in its staging folder's (file names stop at 255 bytes)


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
            fields = entry[len(prefix) :].split("-")
            if (
                entry.startswith(prefix)
                and len(fields) >= 3
                and fields[0].isdigit()
                and not alive(int(fields[0]), fields[1])
            ):
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
            reason = (
                "not a folder"
                if os.path.exists(parent)
                else "a symbolic link that leads nowhere (a loop or a missing target)"
            )
            raise OSError(errno.ENOTDIR, reason, parent)
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        os.mkdir(folder)
    return missing


class _Changed(Exception):
    """Another run moved its output in, or out, between the last look and the final move."""


class Staging:
    """A staging folder for one output; see `staged`."""

    def __init__(self, output, force: bool, inputs: Sequence = ()):
        self.output = output
        self.force = force
        self.inputs = tuple(inputs)
        self.path = None  # the staging folder, once open
        self._seen = {}  # files of the earlier output found unchanged, not read twice
        self._created = []  # parent folders made for it, removed again on failure
        self._existed = False
        self._moved = False
        self._registration = contextlib.ExitStack()

    def open(self) -> "Staging":
        self.output = check_replaceable(self.output, self.force, self.inputs, self._seen)
        self._existed = os.path.lexists(self.output)
        parent, prefix = _staging_prefix(self.output)
        try:
            self._created = _make_parents(parent)
            remove_stale_staging(self.output)
            self.path = tempfile.mkdtemp(prefix=f"{prefix}{writer_id()}-", dir=parent)
        except OSError as err:
            self.discard()
            where = f": {err.filename}" if err.filename else ""
            raise OutputExistsError(
                f"cannot write output {self.output}: {err.strerror or err}{where}"
            ) from None
        self._registration.enter_context(removed_on_interrupt(self.path))
        os.chmod(self.path, 0o777 & ~umask())  # mkdtemp makes it private; the output should not be
        return self

    def moves(self):
        """Moves the folder into place, recorded (`write_record`); first yields what the
        move replaces: None, "existing output" (there when this run began) or "output
        written meanwhile by another run". The loop's body writes what says so (a report);
        when another run moves its output in or out before this one's move, it yields
        again. Only an output of this program is replaced, and one that appeared while
        this run was writing only with --force (else OutputExistsError)."""
        while not self._moved:
            replaced = self._replacing()
            yield replaced
            write_record(self.path)
            follow_umask(self.path)
            try:
                with final_move():
                    self._move(replaced)
            except _Changed:
                continue
            self._moved = True
        self._registration.close()

    def commit(self) -> None:
        for _ in self.moves():
            pass

    def _replacing(self):
        if not os.path.lexists(self.output):
            return None
        if self._existed:
            return "existing output"
        if not self.force:
            check_replaceable(self.output, True, self.inputs, self._seen)  # what is not ours first
            raise OutputExistsError(
                f"output {self.output} appeared while this run was writing it "
                "(another run?); nothing was replaced: pass --force to replace it"
            )
        return "output written meanwhile by another run"

    def _move(self, replaced) -> None:
        """rename(2) into place; an earlier output (only ours) goes aside first and is
        removed after. _Changed when another run moved an output in or out meanwhile."""
        aside = self.path + ".old"
        if replaced is not None:
            check_replaceable(self.output, True, self.inputs, self._seen)  # only ours goes
            try:
                os.rename(self.output, aside)
            except FileNotFoundError:
                raise _Changed() from None
        try:
            _move(self.path, self.output)
        except BaseException as err:
            if isinstance(err, FileExistsError) and os.path.lexists(self.output):
                shutil.rmtree(aside, ignore_errors=True)  # the earlier output goes all the same
                raise _Changed() from None
            with contextlib.suppress(OSError):
                os.rename(aside, self.output)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def discard(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        for folder in self._created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only while empty
        self._registration.close()


@contextlib.contextmanager
def staged(output, force: bool = False, inputs: Sequence = ()):
    """Yields a `Staging` whose `.path` is a folder beside `output`; on success it is
    recorded (its RECORD lists every file) and becomes `output`, in one rename.

    Checked before anything is written (`check_replaceable`), so an unwritable or
    forbidden output fails before any heavy work. The final move is exclusive: when
    another run created `output` meanwhile, this one fails (exit 2) unless `force`;
    `Staging.moves` says which. On any exception, and on SIGINT / SIGTERM in a
    command line, the staging folder (and any parent folder made for it) is removed and
    an existing output is left as it was. Staging folders of killed runs are removed.
    """
    staging = Staging(output, force, inputs).open()
    try:
        yield staging
        staging.commit()
    except BaseException:
        staging.discard()
        raise
