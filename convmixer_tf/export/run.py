"""One export run: the options (`ExportOptions`, the one object both command lines build),
the model at its export size with its facts, the images every file is checked on, and the
formats written in this process or side by side (`export.parallel`)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import numpy as np

from convmixer_tf.config import Preprocessing
from convmixer_tf.errors import BadInput
from convmixer_tf.export import registry
from convmixer_tf.export.base import ExportJob
from convmixer_tf.export.calibration import CALIBRATION_COUNT, VERIFY_COUNT, load_images
from convmixer_tf.export.onnx import check_opset
from convmixer_tf.export.parallel import cores, memory_allows, write_in_processes
from convmixer_tf.export.verify import write_and_check
from convmixer_tf.facts import attach, facts_of
from convmixer_tf.labels import check_class_names

DEFAULT_FORMATS = ("saved_model", "tflite", "onnx")
OUTPUTS = ("logits", "probabilities")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to write, and how: one object, passed down whole.

    Attributes:
        formats: names of `registry.FORMATS` (aliases allowed), or "all".
        calibration_data: an image folder or "tfds:NAME[:SPLIT]" for int8 calibration and
            the held-out check images; None: synthetic images (the rows say so).
        calibration_count: images int8 formats are calibrated on.
        verify_count: images held out from calibration that every file is checked on.
        latency_runs: single-image calls that time each file (at most).
        preprocessing: the files' input size, mean and std; None: the model's own.
        image_size: the input size, for a model saved with a dynamic one.
        raw_rgb: the normalisation inside every graph, so apps feed raw RGB.
        class_names: the labels of TFLite files and the report; None: the model's own.
        nchw: ONNX input as [N, 3, H, W].
        opset: ONNX opset, None for the default.
        tflite_output: "probabilities" (TFLite files end in a softmax) or "logits".
        processes: 1 writes every file in this process; 2 or more writes each group of
            formats that share work in a process of its own, side by side; None: side by
            side where this process may use several cores and the memory available
            covers it (`parallel.memory_allows`).

    Example:
        >>> ExportOptions(formats=("tflite", "tflite_int8"), calibration_data="my_images/")  # doctest: +SKIP
    """

    formats: Tuple[str, ...] = DEFAULT_FORMATS
    calibration_data: Optional[str] = None
    calibration_count: int = CALIBRATION_COUNT
    verify_count: int = VERIFY_COUNT
    latency_runs: int = 10
    preprocessing: Optional[Preprocessing] = None
    image_size: Optional[int] = None
    raw_rgb: bool = True
    class_names: Optional[Tuple[str, ...]] = None
    nchw: bool = False
    opset: Optional[int] = None
    tflite_output: str = "probabilities"
    processes: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.tflite_output not in OUTPUTS:
            raise BadInput(f"tflite_output must be one of {OUTPUTS}, got {self.tflite_output!r}")
        if self.opset is not None:
            check_opset(self.opset)


def check_formats(formats) -> list:
    """Validates format names ("all" expands to every format); keeps order, drops repeats."""
    return [fmt.name for fmt in registry.resolve(formats)]


def export_formats(
    model,
    directory,
    options: ExportOptions = ExportOptions(),
    *,
    log: Callable[[str], None] = lambda message: None,
) -> list:
    """Writes each format of `options` into `directory`, verifies it, returns one row per file.

    `model` is a Keras ConvMixer (any input size: fixed to the preprocessing size here),
    carrying its facts (`facts_of`). `directory` exists. Raises ExportError when
    a file cannot be made or fails verification; files already written stay in
    `directory` (the command lines write into a staging folder).

    Example:
        >>> rows = export_formats(model, "out", ExportOptions(formats=("tflite", "onnx")))  # doctest: +SKIP
    """
    chosen = registry.resolve(options.formats)
    calibrated = any(fmt.calibrated for fmt in chosen)
    job, held_out = prepare_job(model, options, calibrated)
    reference = job.model.predict(held_out, verbose=0, batch_size=8)
    try:
        written = _write(chosen, job, directory, held_out, reference, options=options, log=log)
    finally:
        job.close()
    rows = {}
    for name, (row, runner) in written.items():  # one after the other, nothing else computing
        rows[name] = dict(row, latency_ms=runner.latency_ms(held_out, options.latency_runs))
    inputs = job.calibration_source
    if calibrated:
        inputs = f"{inputs}, last {len(held_out)} (held out from calibration)"
    kind = "raw RGB 0-255" if job.facts.raw_rgb else "normalised"
    return [dict(rows[fmt.name], path=fmt.filename, inputs=inputs, input=kind) for fmt in chosen]


def prepare_job(model, options: ExportOptions, calibrated: bool) -> Tuple[ExportJob, np.ndarray]:
    """The job of a run (the model at its export size, raw RGB in when `options.raw_rgb`, with
    its facts; the calibration images when `calibrated`) and the held-out images."""
    from convmixer_tf.model import rebuild

    facts = facts_of(model)
    pre = options.preprocessing or facts.preprocessing
    if options.image_size:
        pre = pre.replace(input_size=options.image_size)
    height, width = model.input_shape[1:3]
    if height != width:
        raise BadInput(f"export needs a square input, the model takes {(height, width)}")
    size = height or pre.input_size  # a model of a fixed size exports at that size
    exported = rebuild(model, (size, size, 3), pre, raw_rgb=options.raw_rgb or facts.raw_rgb)
    facts = facts_of(exported)
    if options.class_names:
        check_class_names(options.class_names, facts.config.num_classes)
        facts = facts.replace(class_names=options.class_names)
        attach(exported, facts)
    count = options.verify_count + (options.calibration_count if calibrated else 0)
    images, source = load_images(
        options.calibration_data, facts.preprocessing, count, raw_rgb=facts.raw_rgb
    )
    if calibrated and len(images) <= options.verify_count:
        raise BadInput(
            f"{source}: {len(images)} images; int8 needs more than {options.verify_count} "
            f"(the last {options.verify_count} are held out from calibration)"
        )
    held_out = images[-options.verify_count :]
    calibration = images[: -options.verify_count] if calibrated else None
    job = ExportJob(
        exported,
        nchw=options.nchw,
        opset=options.opset,
        tflite_output=options.tflite_output,
        calibration=calibration,
        calibration_source=source,
    )
    return job, held_out


def _write(chosen, job: ExportJob, directory, held_out, reference, *, options, log) -> dict:
    """{name: (row, runner)} of each format: side by side in processes, or one after the
    other here."""
    groups = {}
    for fmt in chosen:
        groups.setdefault(fmt.group, []).append(fmt)
    # this process: the main group
    groups = dict(sorted(groups.items(), key=lambda item: item[0] != "main"))
    if options.processes:
        side_by_side = options.processes > 1
    else:
        side_by_side = cores() > 1 and memory_allows(job.model)
    if len(groups) > 1 and side_by_side:
        return write_in_processes(groups, job, directory, held_out, reference, log=log)
    return write_and_check(chosen, job, directory, held_out, reference, log=log)
