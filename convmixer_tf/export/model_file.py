"""A model file where it enters `predict` and `web`: found (`registry.find`), parsed in its
own runtime, its facts read within their limits and checked against the graph it runs,
before any image is read. A file that fails any of it is BadInput (exit 2) naming the file
and saying what is known of it: empty, truncated or damaged, not written by this project,
facts that disagree with its graph (both numbers named), or a graph without a classifier
head. Nothing here imports TensorFlow; a .keras file or a SavedModel loads it to be read."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.export import registry
from convmixer_tf.export.base import ExportFormat
from convmixer_tf.export.scores import softmax
from convmixer_tf.facts import FACTS_FILE, Facts


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """An opened model file: its path, its format, its `facts` and its runner (a
    session of its runtime; see `ExportFormat.load`).

    Example:
        >>> model = open_model("out/model_int8.onnx")  # doctest: +SKIP
        >>> model.kind, model.class_names[:2], model.probabilities(images).shape  # doctest: +SKIP
        ('onnx_int8', ('tench', 'goldfish'), (8, 1000))
    """

    path: str
    format: ExportFormat
    facts: Facts
    runner: object

    @property
    def kind(self) -> str:
        return self.format.name

    @property
    def class_names(self) -> tuple:
        """The facts' class names, or "class 0", "class 1", ... (one per output)."""
        names = self.facts.class_names
        classes = self.facts.config.num_classes
        return tuple(names) if names else tuple(f"class {i}" for i in range(classes))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of images in the file's input space: its outputs,
        through a softmax unless its graph ends in one (a row may hold NaN or infinity
        when the graph makes them: the caller decides what such an image is)."""
        out = np.asarray(_run(self.path, self.runner, images), np.float32)
        if out.shape != (len(images), self.facts.config.num_classes):
            raise BadInput(
                f"{self.path}: its facts say {self.facts.config.num_classes} classes, its graph "
                f"gives outputs of shape {list(out.shape)} for {len(images)} images"
            )
        return out if self.runner.output == "probabilities" else softmax(out)

    def check_runs(self) -> None:
        """One black image through the graph: BadInput naming the file when its runtime
        cannot run it (a graph that loads but does not fit together is the file's fault),
        or when it gives other than one score per class. `predict` has its first batch."""
        size = self.facts.preprocessing.input_size
        self.probabilities(np.zeros((1, size, size, 3), np.float32))


def open_model(path, *, threads: int = 2, in_folder: str = registry.KERAS.filename) -> ModelFile:
    """The model file at `path` (a file, a SavedModel, or a folder holding `in_folder`),
    opened in its own runtime with `threads` threads and checked (see the module); BadInput
    naming the file otherwise."""
    path, fmt = registry.find(path, in_folder=in_folder)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadInput(f"{path} is empty, not a model file")
    runner = _parsed(path, fmt, threads)
    facts = getattr(runner, "facts", None)  # a .keras file's, read with its layers
    if facts is None and fmt.facts is not None:
        facts = fmt.facts(path)
    if facts is None:
        raise BadInput(
            f"{path} holds no {FACTS_FILE}: not written by this project (or written before "
            "files carried their facts: export it again with this version)"
        )
    check_graph(path, facts, runner)
    return ModelFile(path, fmt, facts, runner)


def _parsed(path, fmt: ExportFormat, threads: int):
    """A runner of `path` in its runtime; BadInput when the runtime refuses the file."""
    try:
        return fmt.load(path, threads)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises for a file it cannot parse
        raise BadInput(
            f"{path} is truncated or damaged (or not a model its runtime runs): "
            f"{one_line(err)[:200]}"
        ) from None


def check_graph(path, facts: Facts, runner) -> None:
    """BadInput naming `path` and both sides when `facts` and the graph `runner`
    runs disagree (classes, input size, a softmax at the end), or when the graph gives
    features, not classes (no classifier head)."""
    classes, size = facts.config.num_classes, facts.preprocessing.input_size
    out = getattr(runner, "output_shape", None)
    if classes == 0 or (out is not None and len(out) != 1):
        shown = f"outputs of shape {list(out)}" if out is not None else "no classes"
        raise BadInput(f"{path} gives features, not classes ({shown}): it has no classifier head")
    if out is not None and out[0] is not None and out[0] != classes:
        raise BadInput(f"{path}: its facts say {classes} classes, its graph gives {out[0]}")
    shape = getattr(runner, "input_shape", None)
    if shape is not None and (len(shape) != 3 or shape[2] not in (3, None)):
        raise BadInput(f"{path}: its graph takes inputs of shape {list(shape)}, not RGB images")
    if shape is not None and any(side not in (None, size) for side in shape[:2]):
        raise BadInput(
            f"{path}: its facts say {size} px, its graph takes {shape[0]} x {shape[1]} px"
        )
    if facts.classifier_activation == "softmax" and runner.output != "probabilities":
        raise BadInput(f"{path}: its facts say its head ends in a softmax, its graph gives logits")
    claimed = {"raw_rgb": facts.raw_rgb, **dataclasses.asdict(facts.config)}
    for key, value in getattr(runner, "shown", {}).items():
        if value != claimed[key]:
            raise BadInput(f"{path}: its facts say {key} {claimed[key]}, its graph shows {value}")


def _run(path, runner, images):
    """The runner's outputs for `images`; BadInput naming `path` and the runtime's first
    line when its runtime fails on the file's own graph."""
    try:
        return runner(np.asarray(images, np.float32))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises for its graph
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(
            f"{path}: its runtime cannot run its graph: {one_line(first)[:200]}"
        ) from None
