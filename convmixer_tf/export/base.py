"""The shape every export format shares: what it is (`ExportFormat`), what the writers of
one run share (`ExportJob`), and how a failed file is reported (`ExportError`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterable, Optional

from convmixer_tf.errors import BadInput, CheckFailed
from convmixer_tf.facts import Facts, attach, facts_of
from convmixer_tf.temporaries import temporary_folder


class ExportError(CheckFailed):
    """An export produced no valid file, or one that does not match Keras (exit code 1)."""


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: what --formats / --export take.
        filename: the file (or folder) it writes inside the output folder.
        summary: one line for --help and the README.
        write: `write(job, path)` writes the file; raises ExportError when it cannot.
        load: `load(path, threads)` returns a runner: NHWC float32 images (in the file's
            input space) -> outputs, with an `output` attribute ("probabilities" when the
            graph ends in a softmax, else "logits") and, where the runtime tells,
            `input_shape` and `output_shape` (one image's, NHWC; None for a free size),
            and `shown`, the facts its graph shows ({"dim": 768, "raw_rgb": True, ...}).
            It raises what its runtime raises for a file that does not parse, or BadInput.
        tolerance: max abs difference from Keras for a float file, relative to the largest
            output when that is above 1; None for a quantised file (judged by top-1).
        aliases: other accepted names.
        calibrated: it needs calibration images.
        describe: `describe(path, check)` -> what its report row adds (`verify.Check`); a
            "problem" in it fails the file.
        group: formats that share work (a traced graph, a converted file) are written by
            one process when the formats of a run are written in parallel.
        facts: `facts(path)` -> the `Facts` a file of this format carries (what
            `convmixer_tf.predict` reads), or None for a file that carries none; BadInput
            when they cannot be read (`read_json` sets the limits).
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
    group: str = "main"
    facts: Optional[Callable] = None


@contextlib.contextmanager
def runtime_path(path):
    """`path` as the runtimes (C++ behind pybind11) take it, UTF-8 text: the name itself, or,
    for a name that is not UTF-8 (Python holds its bytes as surrogate escapes, which pybind11
    refuses), /proc/self/fd/N of a descriptor opened by its bytes, for as long as the block
    runs (a runtime reads or maps its file while it loads it). BadInput where the system
    has no /proc: the name is the problem."""
    path = os.fspath(path)
    if path.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == path:
        yield path
        return
    if not os.path.isdir("/proc/self/fd"):
        raise BadInput(f"{path}: its name is not UTF-8, which the runtime cannot open; rename it")
    fd = os.open(os.fsencode(path), os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """What the writers of one export run share, complete when it is built.

    Attributes:
        model: the Keras graph the files are made from (fixed input size; raw RGB in when
            its facts say so), carrying its facts (`facts`: preprocessing, class names).
        nchw: ONNX input as [N, 3, H, W].
        opset: ONNX opset, None for the default.
        tflite_output: "probabilities" (softmax at the end, what phone apps show) or "logits".
        calibration: images in the files' input space for calibrated formats (never
            the images a file is checked on), or None.
        calibration_source: where they came from, for the report.
        made: what the writers of the run made once (`shared`), its scratch folder among
            them; `cleanup` removes that folder (`close`). A worker process gets its own.
    """

    model: object
    nchw: bool = False
    opset: Optional[int] = None
    tflite_output: str = "probabilities"
    calibration: Optional[object] = None
    calibration_source: str = ""
    made: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    cleanup: contextlib.ExitStack = dataclasses.field(
        default_factory=contextlib.ExitStack, compare=False, repr=False
    )

    @property
    def facts(self) -> Facts:
        """The model's facts, what every writer reads: those it carries (`facts_of`)."""
        return facts_of(self.model)

    def shared(self, key, make: Callable[[], object]):
        """`make()` once per key for the whole run (a traced graph several files come from)."""
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def scratch(self) -> str:
        """A temporary folder that lives as long as the job (see `close`)."""
        return self.shared("scratch", lambda: self.cleanup.enter_context(temporary_folder()))

    def calibration_samples(self) -> Iterable:
        if self.calibration is None or not len(self.calibration):
            raise BadInput("this format needs calibration images")
        return (image[None] for image in self.calibration)

    def close(self):
        self.made.clear()
        self.cleanup.close()

    def __reduce__(self):
        """A worker process (`export.parallel`) gets the job with the model as its config and
        weights (cheaper than Keras' own pickling, a .keras archive; docs/export.md), its
        facts attached, and nothing made yet."""
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("model", "made", "cleanup")
        }
        model = (self.model.get_config(), self.model.get_weights(), self.facts)
        return _rebuilt, (*model, fields)


def _rebuilt(config, weights, facts, fields: dict) -> ExportJob:
    import keras

    model = keras.Model.from_config(config)
    model.set_weights(weights)
    return ExportJob(attach(model, facts), **fields)
