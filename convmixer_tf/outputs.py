"""Writing outputs so that nothing is half-written and nothing of the user's is lost.

- `write_atomic`: a file appears whole or not at all, with the umask's mode.
- `write_record`: each output folder holds a RECORD of what the command wrote there (every
  file's path, size and sha256, as a wheel's), so `--force` replaces a folder only when
  everything in it is listed and unchanged (`check_replaceable`).
- `staging.staged` builds an output folder beside its place and moves it there at the end.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import stat
from typing import Callable, Optional, Sequence

from convmixer_tf.errors import BadInput
from convmixer_tf.interrupts import remove_file, removed_on_interrupt
from convmixer_tf.temporaries import TEMPORARY, temporary_name


class OutputExistsError(BadInput):
    """The output exists and may not be replaced (bad input: exit code 2)."""


def write_atomic(path, data, exclusive: bool = False) -> str:
    """Writes bytes or text to `path` through a temporary file beside it: readers see the
    old file or the new one, never half of it. With `exclusive`, a file that exists at
    `path` by then is left alone (OutputExistsError): link(2) never replaces a file."""
    path = os.fspath(path)
    tmp = temporary_name(path)
    with removed_on_interrupt(tmp):
        try:
            # the umask decides the mode
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(
                fd, "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w"
            ) as f:
                f.write(data)
            try:
                if exclusive:
                    os.link(tmp, path)
                else:
                    os.replace(tmp, path)
            except FileExistsError:  # only link(2) raises it
                raise OutputExistsError(
                    f"{path} appeared while this run was working; it was not replaced"
                ) from None
        finally:
            remove_file(tmp)
    return path


def write_json_atomic(path, data, exclusive: bool = False) -> str:
    return write_atomic(path, json.dumps(data, indent=2, default=jsonable) + "\n", exclusive)


def jsonable(value):  # json.dumps' default= for numpy scalars and arrays
    return value.tolist() if hasattr(value, "tolist") else str(value)


def follow_umask(root) -> None:
    """Gives every folder under `root` the mode the umask gives new folders (TensorFlow
    makes its own 0755 whatever the umask). A loop, not os.walk, which recurses once a
    level; a folder that cannot be listed is skipped, as os.walk skips it."""
    mode = 0o777 & ~umask()
    pending = [os.fspath(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                folders = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for path in folders:
            os.chmod(path, mode)
        pending += folders


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


RECORD = "RECORD"
_MOST_RECORD_BYTES = 16 << 20  # far above what any command lists: a larger RECORD is not ours
_NO_LINK_NO_WAIT = os.O_NOFOLLOW | os.O_NONBLOCK
_DIGEST = re.compile(r"sha256=[A-Za-z0-9_-]{43}")
_SIZE = re.compile(r"[0-9]{1,20}")
_WAY_OUT = "it is never replaced, even with --force: move or delete it yourself, or choose another --output"


def write_record(folder, ours: Callable[[str], bool] = lambda path: True) -> None:
    """Writes `folder`'s RECORD of what a command wrote there, as a wheel's RECORD: a line
    `path,sha256=DIGEST,SIZE` per file (URL-safe base64, no padding), `path/,,` per empty
    folder, and `RECORD,,`; every entry whose relative path `ours` accepts (never a link:
    no command writes one)."""
    rows = []
    for path, status in _entries(folder):
        if path == RECORD or status is None or not ours(path):
            continue
        if stat.S_ISREG(status.st_mode):
            rows.append([path, *_digest(os.path.join(folder, path))])
        elif stat.S_ISDIR(status.st_mode):
            rows.append([path, "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([*sorted(rows), [RECORD, "", ""]])
    write_atomic(os.path.join(folder, RECORD), text.getvalue().encode("utf-8", "surrogateescape"))


def read_record(folder) -> Optional[dict]:
    """`folder`'s RECORD: {relative path: (size, "sha256=DIGEST")}, None for an empty folder
    and the RECORD itself; None when it has none. A RECORD this program would not have
    written (a user may edit it) is OutputExistsError."""
    try:
        with _opened(os.path.join(folder, RECORD)) as f:
            data = f.read(_MOST_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _kept(folder, f"has a {RECORD} that cannot be read ({err.strerror})") from None
    if len(data) > _MOST_RECORD_BYTES:
        raise _kept(folder, f"has a {RECORD} larger than this program writes")
    lines = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    rows = {}
    try:
        for row in lines:
            path, value = _row(row)
            if path in rows:
                raise ValueError("a path listed twice")
            rows[path] = value
    except (csv.Error, ValueError) as err:
        raise _kept(
            folder, f"has a {RECORD} this program did not write (line {lines.line_num}: {err})"
        ) from None
    if rows.get(RECORD, ()) is not None:
        raise _kept(folder, f"has a {RECORD} this program did not write (it must list itself)")
    return rows


def _row(row) -> tuple:
    """(path, (size, digest) or None) of one line of a RECORD; ValueError when this program
    would not have written it."""
    if len(row) != 3:
        raise ValueError("not three fields")
    path, digest, size = row
    parts = path.removesuffix("/").split("/")
    if path.startswith("/") or "\x00" in path or any(part in ("", ".", "..") for part in parts):
        raise ValueError("a path that is not a place inside the folder")
    if not digest and not size and (path == RECORD or path.endswith("/")):
        return path, None
    if path.endswith("/") or not _DIGEST.fullmatch(digest) or not _SIZE.fullmatch(size):
        raise ValueError("not a file's sha256 and size")
    return path, (int(size), digest)


def not_ours(folder, seen: Optional[dict] = None) -> list:
    """What in `folder` its RECORD does not list as it is now (relative paths; a file whose
    content changed says so): entries not listed, links, unreadable folders. A listed file
    is compared by its size, then, only where the size matches, its sha256; `seen` ({path:
    its lstat}) holds files found unchanged before, not read again while their lstat stays.
    The temporary file of a killed write (`temporary_name`) of a listed file is ours.
    OutputExistsError when the folder has no RECORD, or one this program did not write."""
    listed = read_record(folder)
    if listed is None:
        held = sorted(os.listdir(folder))
        raise _kept(
            folder,
            f"holds {_shown(held)} and no {RECORD} of what this program wrote there "
            "(an output of an earlier version, or not one of ours)",
        )
    found = []
    for path, status in _entries(folder):
        regular = status is not None and stat.S_ISREG(status.st_mode)
        if status is None:
            found.append(f"{path} (cannot be read)")
        elif regular and listed.get(path):
            if not _unchanged(os.path.join(folder, path), status, listed[path], seen):
                found.append(f"{path} (changed since it was written)")
        elif regular and (path == RECORD or _temporary_of(path, listed)):
            continue
        elif not (stat.S_ISDIR(status.st_mode) and path in listed):
            found.append(path)
    return sorted(found)


def _unchanged(path, status, listed: tuple, seen: Optional[dict]) -> bool:
    size, digest = listed
    key = (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev)
    if status.st_size != size:
        return False
    if seen is not None and seen.get(path) == key:
        return True
    try:
        same = _digest(path) == (digest, str(size))
    except OSError:
        return False
    if same and seen is not None:
        seen[path] = key
    return same


def _temporary_of(path, listed) -> bool:
    folder, _, name = path.rpartition("/")
    match = TEMPORARY.fullmatch(name)
    return match is not None and f"{folder}/{match['name']}".lstrip("/") in listed


def _entries(root):
    """(relative path, lstat, or None when it cannot be read) of everything under `root`
    but the folders that hold something: files, links and others, empty folders as "name/"."""
    pending = [("", None)]
    while pending:
        folder, status = pending.pop()
        try:
            names = sorted(os.listdir(os.path.join(root, folder)))
        except OSError:
            yield folder, None
            continue
        if folder and not names:
            yield folder, status
        for name in names:
            try:
                entry = os.lstat(os.path.join(root, folder + name))
            except OSError:
                yield folder + name, None
                continue
            if stat.S_ISDIR(entry.st_mode):
                pending.append((f"{folder}{name}/", entry))
            else:
                yield folder + name, entry


def _opened(path):
    """Opened to read: never through a link, and a FIFO does not block."""
    return open(path, "rb", opener=lambda name, flags: os.open(name, flags | _NO_LINK_NO_WAIT))


def sha256(f):
    """The sha256 hash object of what is left to read of the binary file `f`, read a MiB at a
    time (hashlib.file_digest does the same from Python 3.11 on)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest


def _digest(path) -> tuple:
    """("sha256=DIGEST", "SIZE") of a file as read, as a wheel's RECORD writes them (a link
    is not followed)."""
    with _opened(path) as f:
        digest = sha256(f).digest()
        size = f.tell()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode(), str(size)


def _shown(paths) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _kept(folder, why: str) -> OutputExistsError:
    return OutputExistsError(f"output {folder} {why}; {_WAY_OUT}")


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
            raise OutputExistsError(
                f"output {output} {what} the input {given}; choose another --output"
            )
    return output


def check_replaceable(
    output, force: bool, inputs: Sequence = (), seen: Optional[dict] = None
) -> str:
    """Refuses (OutputExistsError, exit 2) an output that would lose something of the user's.

    An absent output is fine. An existing one needs `force`, and even then is only
    replaced when it is empty or holds nothing but what its RECORD lists, unchanged
    (`not_ours`, with `seen`). No output may contain, equal or lead through a link to any
    of `inputs`. Returns the absolute output path.
    """
    output = check_inputs_outside(output, inputs)
    if os.path.islink(output):
        raise OutputExistsError(f"output {output} is a symbolic link; give the folder it should be")
    if not os.path.lexists(output):
        return output
    if not os.path.isdir(output):
        raise OutputExistsError(
            f"output {output} exists and is a file, not an output folder; choose another --output"
        )
    kept = not_ours(output, seen) if os.listdir(output) else []
    if kept:
        raise _kept(output, f"holds files this program did not write ({_shown(kept)})")
    if not force:
        raise OutputExistsError(f"output {output} exists; pass --force to replace it")
    return output


def check_file(
    path, is_ours: Callable[[object], bool], inputs: Sequence = (), option: str = "--output"
) -> bool:
    """A file output may be new, or an earlier one of this command (`is_ours` of its JSON),
    which is replaced; anything else is refused (exit 2). True when it is an earlier one."""
    check_inputs_outside(path, inputs)
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise OutputExistsError(
                f"cannot write {option} {path}: {parent} is not a writable folder"
            )
        return False
    try:
        with _opened(path) as f:  # a FIFO reads as empty, a link is not followed: neither is ours
            ours = is_ours(json.load(f))
    except (OSError, ValueError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise OutputExistsError(
            f"{option} {path} exists and is not an earlier output of this command; "
            f"it is not replaced: choose another {option}"
        )
    return True
