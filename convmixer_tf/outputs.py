"""Writing outputs so that nothing is half-written and nothing of the user's is lost.

- `write_atomic`: a file appears whole or not at all, with the umask's mode.
- `Output`: what one command writes (a marker file and the exact paths of every file), so
  `--force` tells, all the way down, an earlier output of that command from anything else.
- `staging.staged` builds an output folder beside its place and moves it there at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Callable, Optional, Sequence, Tuple

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
    makes its own 0755 whatever the umask)."""
    mode = 0o777 & ~umask()
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def exactly(*paths) -> tuple:
    """`Output.files` entries for paths written under exactly these names."""
    return tuple("/".join(re.escape(part) for part in path.split("/")) for path in paths)


@dataclasses.dataclass(frozen=True)
class Output:
    r"""What one command writes as its output folder, and how to recognise one it wrote.

    Args:
        tool: the command, for messages.
        marker: a file the command always writes there.
        is_ours: given the marker's parsed JSON, True when it is the command's.
        files: every path the command may write there, relative and "/"-separated, as one
            regular expression per path segment, matched a segment at a time (never
            across "/"): exact names (`exactly`), or the names a writer makes up
            (r"variables\.data-\d{5}-of-\d{5}"); "dir/" for a folder that may stay empty.
            Anything else anywhere in the tree is the user's.
    """

    tool: str
    marker: str
    is_ours: Callable[[object], bool]
    files: Tuple[str, ...]

    @functools.cached_property
    def _patterns(self) -> tuple:
        """(compiled segments, is a folder) of each entry of `files`."""
        return tuple(
            (tuple(re.compile(part) for part in entry.rstrip("/").split("/")), entry.endswith("/"))
            for entry in self.files
        )

    def writes_file(self, parts: Sequence[str]) -> bool:
        """True when the path of segments `parts` is a file this command writes."""
        return any(not folder and _match(segments, parts) for segments, folder in self._patterns)

    def writes_folder(self, parts: Sequence[str]) -> bool:
        """True when `parts` is a folder this command writes into, or makes."""
        for segments, folder in self._patterns:
            if len(parts) < len(segments) or folder:
                if _match(segments[: len(parts)], parts):
                    return True
        return False

    def _temporary_of_ours(self, parts: Sequence[str]) -> bool:
        """A file of ours being written when its writer was killed (`temporary_name`)."""
        match = TEMPORARY.fullmatch(parts[-1])
        return match is not None and self.writes_file([*parts[:-1], match["name"]])

    def foreign(self, root) -> list:
        """What under `root` this command did not write (relative paths): every file, link or
        other entry whose path is not one of `files`, and empty folders it does not make."""
        found = []
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            parts = [] if rel == "." else rel.split("/")
            if parts and not dirs and not files and not self.writes_folder(parts):
                found.append(rel)
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    found.append("/".join([*parts, name]))
                elif name in files and not (
                    os.path.isfile(path)
                    and (
                        self.writes_file([*parts, name]) or self._temporary_of_ours([*parts, name])
                    )
                ):
                    found.append("/".join([*parts, name]))
        return sorted(found)

    def earlier_output(self, folder) -> Optional[list]:
        """None when `folder` is empty or an output of this command; else what in it is not."""
        try:
            with open(os.path.join(folder, self.marker)) as f:
                ours = self.is_ours(json.load(f))
        except (OSError, ValueError):
            ours = False
        foreign = self.foreign(folder)
        if not os.listdir(folder) or (ours and not foreign):
            return None
        return foreign or [f"{self.marker} missing"]


def _match(segments, parts) -> bool:
    return len(segments) == len(parts) and all(s.fullmatch(p) for s, p in zip(segments, parts))


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
        raise OutputExistsError(
            f"output {output} exists and is a file, not an output folder of {kind.tool}; "
            "choose another --output"
        )
    foreign = kind.earlier_output(output)
    if foreign is not None:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise OutputExistsError(
            f"output {output} exists and holds files {kind.tool} did not write ({shown}); "
            "it is never replaced, even with --force: choose another --output"
        )
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
        with open(path) as f:
            ours = is_ours(json.load(f)) and not os.path.islink(path)
    except (OSError, ValueError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise OutputExistsError(
            f"{option} {path} exists and is not an earlier output of this command; "
            f"it is not replaced: choose another {option}"
        )
    return True
