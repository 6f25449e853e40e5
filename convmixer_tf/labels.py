"""Class names: the check every name of a model passes (one printable line each, one per
class), a labels file read line by line, and ImageNet-1k's names from timm's offline table."""

from __future__ import annotations

import collections
import unicodedata
from typing import Optional, Sequence, Tuple

from convmixer_tf.errors import BadInput

_FORBIDDEN = ("Cc", "Zl", "Zp")  # control characters and line / paragraph separators


def _unprintable(name: str) -> Optional[str]:
    """Why `name` cannot be a single-line label ("is empty", "holds the control character
    U+XXXX"), or None."""
    bad = next((c for c in name if unicodedata.category(c) in _FORBIDDEN or c == "\ufeff"), None)
    if bad:
        return f"holds the control character U+{ord(bad):04X}"
    if not name.strip():
        return "is empty"
    return None


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
                f"class name {i} ({name!r}) {why}: class names must be printable single lines"
            )


def read_labels(path, allow_duplicates: bool = False) -> Tuple[str, ...]:
    """Class names from a text file, one per line ("\\n" or "\\r\\n"; a leading UTF-8 BOM
    and blank lines at the end are ignored). A control character, an empty line or,
    unless `allow_duplicates`, a repeated name is a ValueError naming the line."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
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
    for number, line in enumerate(lines, 1):
        why = _unprintable(line)
        if why:
            raise BadInput(
                f"labels file {path}, line {number} {why} ({line!r}): one printable name per line"
            )
    names = tuple(line.strip() for line in lines)
    repeated = {
        name: [i + 1 for i, n in enumerate(names) if n == name]
        for name, count in collections.Counter(names).items()
        if count > 1
    }
    if repeated and not allow_duplicates:
        shown = "; ".join(
            f"{name!r} on lines {', '.join(map(str, at))}"
            for name, at in list(repeated.items())[:3]
        )
        raise BadInput(
            f"labels file {path} repeats names ({shown}): an app could not tell those classes "
            "apart; pass --allow-duplicate-labels to keep them"
        )
    return names


def imagenet_class_names(ids: bool = False) -> Optional[Tuple[str, ...]]:
    """ImageNet-1k class names in label order, from timm's offline table: the first words
    of the descriptions ("tench", "goldfish", ...), or with `ids` the WordNet ids tfds
    uses ("n01440764", ...); None when timm is not installed."""
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
