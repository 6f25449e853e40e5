"""Class names and other text a model's facts show: the check every such text passes
(one printable line: `str.isprintable()`, so no control, format or separator character
but the space), a labels file read line by line, and ImageNet-1k's names from timm's
offline table."""

from __future__ import annotations

import collections
import os
import sys
import unicodedata
from typing import Optional, Sequence, Tuple

from convmixer_tf.errors import BadInput

# How an unprintable character is named: line breaks and separators are control characters
# to a reader of a line; format characters (U+202E, U+200B) reorder or hide text.
_KINDS = {"Cc": "control", "Zl": "control", "Zp": "control", "Cf": "format"}


def _unprintable(name: str) -> Optional[str]:
    """Why `name` cannot be a single-line label ("is empty", "holds the control character
    U+XXXX"), or None."""
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        kind = _KINDS.get(unicodedata.category(bad), "unprintable")
        return f"holds the {kind} character U+{ord(bad):04X}"
    if not name.strip():
        return "is empty"
    return None


def check_text(field: str, text) -> str:
    """`text` as a fact shown to a user (a variant's name, a source's file or repo): one
    non-empty printable line; BadInput naming `field` otherwise."""
    why = _unprintable(text) if isinstance(text, str) else "is not text"
    if why:
        raise BadInput(f"{field} ({text!r:.80}) {why}: it must be one printable line")
    return text


def check_class_names(names: Sequence[str], num_classes: int) -> None:
    """ValueError (exit 2) unless there is one non-empty, printable single-line name per class."""
    if num_classes == 0:
        raise BadInput("class names were given, but the model has no classifier head")
    if len(names) != num_classes:
        raise BadInput(f"{len(names)} class names for a model with {num_classes} classes")
    for i, name in enumerate(names):
        why = _unprintable(name)
        if why:
            raise BadInput(
                f"class name {i} ({name!r:.80}) {why}: class names must be printable single lines"
            )


# The largest labels file read (bytes): ample for 21,841 ImageNet-21k names of any length
# a label has; anything larger is not a labels file.
LABELS_LIMIT = 16 * 2**20


def read_labels(path, allow_duplicates: bool = False) -> Tuple[str, ...]:
    """Class names from a text file, one per line ("\\n" or "\\r\\n"; a leading UTF-8 BOM
    and blank lines at the end are ignored). A control character, an empty line or,
    unless `allow_duplicates`, a repeated name is a ValueError naming the line; so is a
    file that is not a regular file of at most LABELS_LIMIT bytes."""
    lines = _lines(path)
    for number, line in enumerate(lines, 1):
        why = _unprintable(line)
        if why:
            raise BadInput(
                f"labels file {path}, line {number} {why} ({line!r:.80}): one printable name per line"
            )
    names = tuple(line.strip() for line in lines)
    at = collections.defaultdict(list)
    for number, name in enumerate(names, 1):
        at[name].append(number)
    repeated = [(name, numbers) for name, numbers in at.items() if len(numbers) > 1]
    if repeated and not allow_duplicates:
        shown = "; ".join(
            f"{name!r:.40} on lines {', '.join(map(str, numbers[:5]))}"
            for name, numbers in repeated[:3]
        )
        raise BadInput(
            f"labels file {path} repeats names ({shown}): an app could not tell those classes "
            "apart; pass --allow-duplicate-labels to keep them"
        )
    return names


def _lines(path) -> list:
    """The lines of labels file `path`, without their line ends and the blank lines at the end."""
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read
            raise BadInput(f"labels file {path} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(LABELS_LIMIT + 1)
        if len(data) > LABELS_LIMIT:
            raise BadInput(f"labels file {path} is larger than {LABELS_LIMIT} bytes")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise BadInput(f"cannot read labels file {path}: {reason}") from None
    lines = [
        line[:-1] if line.endswith("\r") else line
        for line in text.removeprefix("\ufeff").split("\n")
    ]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise BadInput(f"labels file {path} is empty")
    return lines


def imagenet_class_names(ids: bool = False) -> Optional[Tuple[str, ...]]:
    """ImageNet-1k class names in label order, from timm's offline table: the first words
    of the descriptions ("tench", "goldfish", ...), or with `ids` the WordNet ids tfds
    uses ("n01440764", ...); None when timm is not installed."""
    # Loading triton's library after TensorFlow's crashes the process (SIGSEGV) with torch's
    # CUDA builds, and timm imports it through torchvision; nothing here compiles kernels.
    sys.modules.setdefault("triton", None)
    try:
        from timm.data import ImageNetInfo
    except Exception:  # timm missing, or torchvision broken beside this torch build
        return None
    info = ImageNetInfo()
    return (
        tuple(info.label_names())
        if ids
        else tuple(d.split(",")[0].strip() for d in info.label_descriptions())
    )
