"""The export formats, as one explicit tuple: `FORMATS`, in the order "all" writes them.

Everything else (export_formats, verify, both command lines' choices and help, the
README's table) reads this tuple when it runs, so a test that needs a format of its own
patches it (`monkeypatch.setattr(registry, "FORMATS", ...)`). A new format is one module
that defines its `ExportFormat`, plus one entry here. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from convmixer_tf.errors import BadInput
from convmixer_tf.export import keras_file, onnx, onnx_int8, saved_model, tflite
from convmixer_tf.export.base import ExportFormat

FORMATS: Tuple[ExportFormat, ...] = (
    saved_model.FORMAT,
    *tflite.FORMATS,
    onnx.FORMAT,
    onnx_int8.FORMAT,
)
# The .keras file: read as the exported files are (predict, web), written by the converter
# and training rather than by the export.
KERAS = keras_file.FORMAT


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


def find(path, *, in_folder: str = KERAS.filename) -> Tuple[str, ExportFormat]:
    """The model file at `path` and its format: what decides, everywhere, what kind of file
    a path is. A folder holding saved_model.pb is a SavedModel, whatever its name; a file
    is known by the end of its name, as its format's file ends (`model_int8.onnx` ->
    onnx_int8, `cats.tflite` -> tflite, `x.keras` -> KERAS; the longest match wins); any
    other folder holds `in_folder` (the converter's output folder holds model.keras).
    BadInput naming the path otherwise: missing, not a regular file (a FIFO would block
    its reader), of no known kind, or a folder of several model files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BadInput(f"model not found: {path}")
    fmt = _kind(path)
    if fmt is saved_model.FORMAT:
        return path, fmt
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, in_folder)):
            return find(os.path.join(path, in_folder))
        found = sorted(name for name in os.listdir(path) if _kind(os.path.join(path, name)))
        if found:
            raise BadInput(
                f"{path} holds no {in_folder}; name one of its model files ({', '.join(found[:8])})"
            )
        fmt = None
    if fmt is None:
        raise BadInput(
            f"{path} is not a model file this project writes (.keras, .tflite, .onnx or a "
            "SavedModel folder)"
        )
    if not os.path.isfile(path):
        raise BadInput(f"{path} is not a regular file")
    return path, fmt


def _kind(path: str) -> Optional[ExportFormat]:
    """The format of `path`: a SavedModel by what its folder holds, a file by the end of
    its name (None: neither)."""
    if saved_model.is_saved_model(path):
        return saved_model.FORMAT
    files = [fmt for fmt in (*FORMATS, KERAS) if fmt is not saved_model.FORMAT]
    matches = [fmt for fmt in files if path.endswith(_ending(fmt))]
    return max(matches, key=lambda fmt: len(_ending(fmt)), default=None)


def _ending(fmt: ExportFormat) -> str:
    """How the name of a file of `fmt` ends: its file name after "model" (`_int8.onnx`)."""
    return fmt.filename.removeprefix("model")


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
