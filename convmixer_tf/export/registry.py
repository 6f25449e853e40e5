"""The export formats, as one explicit list: `FORMATS`, in the order "all" writes them.

Everything else (export_formats, verify, both command lines' choices and help, the
README's table) reads this list. A new format is one module that defines its
`ExportFormat`, plus one entry here. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
from typing import List, Sequence

from convmixer_tf.errors import BadInput
from convmixer_tf.export import onnx, onnx_int8, saved_model, tflite
from convmixer_tf.export.base import ExportFormat

FORMATS: List[ExportFormat] = [saved_model.FORMAT, *tflite.FORMATS, onnx.FORMAT, onnx_int8.FORMAT]
# The formats every process knows: a worker process (a fresh interpreter) writes these only;
# formats registered later (plug-ins) are written in the process that registered them.
BUILT_IN = tuple(FORMATS)


def names() -> List[str]:
    return [f.name for f in FORMATS]


def get(name: str) -> ExportFormat:
    for fmt in FORMATS:
        if name == fmt.name or name in fmt.aliases:
            return fmt
    raise BadInput(f"unknown export format {name!r}; allowed values: {', '.join(names())}, all")


def resolve(requested: Sequence[str]) -> List[ExportFormat]:
    """Format names ("all" for every one, aliases allowed) -> formats, in order, once each."""
    chosen = []
    for name in requested:
        named = list(FORMATS) if name == "all" else [get(name)]
        chosen += [fmt for fmt in named if fmt not in chosen]
    return chosen


def recognise(path) -> ExportFormat:
    """The format of an exported file, from the file itself."""
    path = os.fspath(path)
    for fmt in FORMATS:
        if fmt.recognises is not None and fmt.recognises(path):
            return fmt
    raise BadInput(
        f"cannot tell the format of {path}: expected one of "
        f"{', '.join(sorted({f.filename for f in FORMATS}))}"
    )


def help_text(indent: str = "  ") -> str:
    """One line per format, for --help."""
    rows = [
        (f.name + (f" ({', '.join(f.aliases)})" if f.aliases else ""), f.filename, f.summary)
        for f in FORMATS
    ]
    width, fwidth = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{indent}{n:<{width}}  {fn:<{fwidth}}  {s}" for n, fn, s in rows)


def markdown_table() -> str:
    """The README's table of formats."""
    lines = ["| format | file | what | checked against Keras |", "|---|---|---|---|"]
    for f in FORMATS:
        check = (
            f"max abs diff <= {f.tolerance:.0e}"
            if f.tolerance is not None
            else "top-1 agreement (quantised)"
        )
        lines.append(f"| `{f.name}` | `{f.filename}` | {f.summary} | {check} |")
    return "\n".join(lines)


def register(fmt: ExportFormat) -> ExportFormat:
    """Appends a format (a name already taken is an error): for plug-ins and tests."""
    clash = sorted(
        {name for f in FORMATS for name in (f.name, *f.aliases)} & {fmt.name, *fmt.aliases}
    )
    if clash:
        raise ValueError(f"export format name already registered: {', '.join(clash)}")
    FORMATS.append(fmt)
    return fmt


@contextlib.contextmanager
def registered(fmt: ExportFormat):
    """Registers `fmt` for the duration of a `with` block."""
    register(fmt)
    try:
        yield fmt
    finally:
        FORMATS.remove(fmt)
