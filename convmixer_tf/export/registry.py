"""The export formats, in one registry: each format is one module that registers an
`ExportFormat` (name, file, tolerance, writer, runner, what its report row adds), and
everything else (export_formats, verify, both command lines' choices and help, the
README's table) reads it from here.

Adding a format: a module with `FORMATS = [ExportFormat(...)]` and its name in
BUILTIN_MODULES. Nothing in this module imports TensorFlow: command-line help and
argument checks stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from convmixer_tf.common import CheckFailed

# One line per format module (convmixer_tf.export.<name>), in the order of "all".
BUILTIN_MODULES = ("saved_model", "tflite", "onnx", "onnx_int8")

OUTPUTS = ("logits", "probabilities")


class ExportError(CheckFailed):
    """An export produced no valid file, or one that does not match Keras (exit code 1)."""


@dataclasses.dataclass
class ExportJob:
    """What the writers of one export run share.

    Attributes:
        model: the Keras graph the files are made from (fixed input size; raw 0-255 RGB
            in when `raw_rgb`).
        info: its `convmixer_tf.contract.ModelInfo` (preprocessing, class names).
        raw_rgb: the preprocessing (mean/std) is inside the graph.
        nchw: ONNX input as [N, 3, H, W].
        opset: ONNX opset, None for the default.
        tflite_output: "probabilities" (softmax at the end, what phone apps show) or "logits".
        calibration: images in the files' input space for calibrated formats (never
            the images a file is checked on).
        calibration_source: where they came from, for the report.
    """

    model: object
    info: object
    raw_rgb: bool = True
    nchw: bool = False
    opset: Optional[int] = None
    tflite_output: str = "probabilities"
    calibration: Optional[object] = None
    calibration_source: str = ""
    _shared: Dict[object, object] = dataclasses.field(default_factory=dict)
    _scratch: Optional[str] = None

    def __post_init__(self):
        if self.tflite_output not in OUTPUTS:
            raise ValueError(f"tflite_output must be one of {OUTPUTS}, got {self.tflite_output!r}")

    def shared(self, key, make: Callable[[], object]):
        """`make()` once per key for the whole run (a traced graph several files come from)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def scratch(self) -> str:
        """A temporary folder that lives as long as the job (see `close`)."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="convmixer-export-")
        return self._scratch

    def calibration_samples(self) -> Iterable:
        if self.calibration is None or not len(self.calibration):
            raise ValueError("this format needs calibration images")
        return (image[None] for image in self.calibration)

    def close(self):
        self._shared.clear()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: what --formats / --export take.
        filename: the file (or folder) it writes inside the output folder.
        summary: one line for --help and the README.
        write: `write(job, path)` writes the file; raises ExportError when it cannot.
        load: `load(path, threads)` returns a runner: NHWC float32 images (in the file's
            input space) -> outputs, with an `output` attribute ("logits" or "probabilities").
        tolerance: max abs difference from Keras for a float file; None for a quantised
            one (judged by its top-1 agreement).
        aliases: other accepted names.
        calibrated: it needs calibration images.
        describe: `describe(path, check)` -> what its report row adds (`verify.Check`: the
            runner, the Keras model, the held-out inputs, the job); a "problem" in it fails
            the file.
        recognises: `recognises(path)` -> True for a file of this format (verify of a path).
        quantize: the value of the export CLI's --quantize that adds this format.
    """

    name: str
    filename: str
    summary: str
    write: Callable
    load: Callable
    tolerance: Optional[float] = None
    aliases: tuple = ()
    calibrated: bool = False
    describe: Optional[Callable] = None
    recognises: Optional[Callable] = None
    quantize: Optional[str] = None


_REGISTRY: Dict[str, ExportFormat] = {}
_loaded = False


def register(fmt: ExportFormat) -> ExportFormat:
    """Adds a format (a name already taken is an error)."""
    _load_builtins()
    taken = {name for f in _REGISTRY.values() for name in (f.name, *f.aliases)}
    clash = sorted(taken & {fmt.name, *fmt.aliases})
    if clash:
        raise ValueError(f"export format name already registered: {', '.join(clash)}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        for fmt in importlib.import_module(f"convmixer_tf.export.{module}").FORMATS:
            _REGISTRY[fmt.name] = fmt


def formats() -> List[ExportFormat]:
    """Every registered format, in the order "all" writes them."""
    _load_builtins()
    return list(_REGISTRY.values())


def names() -> List[str]:
    return [f.name for f in formats()]


def get(name: str) -> ExportFormat:
    for fmt in formats():
        if name == fmt.name or name in fmt.aliases:
            return fmt
    raise ValueError(f"unknown export format {name!r}; allowed values: {', '.join(names())}, all")


def resolve(requested: Sequence[str]) -> List[ExportFormat]:
    """Format names ("all" for every one, aliases allowed) -> formats, in order, once each."""
    chosen = []
    for name in requested:
        for fmt in formats() if name == "all" else [get(name)]:
            if fmt not in chosen:
                chosen.append(fmt)
    return chosen


def recognise(path) -> ExportFormat:
    """The format of an exported file, from the file itself."""
    path = os.fspath(path)
    for fmt in formats():
        if fmt.recognises is not None and fmt.recognises(path):
            return fmt
    raise ValueError(f"cannot tell the format of {path}: expected one of "
                     f"{', '.join(sorted({f.filename for f in formats()}))}")


def filenames() -> set:
    return {f.filename for f in formats()}


def help_text(indent: str = "  ") -> str:
    """One line per format, for --help."""
    rows = [(f.name + (f" ({', '.join(f.aliases)})" if f.aliases else ""), f.filename, f.summary) for f in formats()]
    width = max(len(r[0]) for r in rows)
    fwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"{indent}{n:<{width}}  {fn:<{fwidth}}  {s}" for n, fn, s in rows)


def markdown_table() -> str:
    """The README's table of formats."""
    lines = ["| format | file | what | checked against Keras |", "|---|---|---|---|"]
    for f in formats():
        check = f"max abs diff <= {f.tolerance:.0e}" if f.tolerance is not None else "top-1 agreement (quantised)"
        lines.append(f"| `{f.name}` | `{f.filename}` | {f.summary} | {check} |")
    return "\n".join(lines)


@contextlib.contextmanager
def registered(fmt: ExportFormat):
    """Registers `fmt` for the duration of a `with` block (tests, plug-ins)."""
    register(fmt)
    try:
        yield fmt
    finally:
        unregister(fmt.name)
