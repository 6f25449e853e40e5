"""Exporters: every format of `registry` (SavedModel, TFLite float32/float16/dynamic/int8,
ONNX), each file verified.

Every file is loaded back by its own runtime (tf.saved_model, LiteRT, onnxruntime)
and compared with the Keras model before it counts as written. Importing this package
loads no TensorFlow; the writers do, when called.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

from convmixer_tf.export import registry
from convmixer_tf.export.calibration import CALIBRATION_COUNT, VERIFY_COUNT
from convmixer_tf.export.registry import ExportError, ExportFormat, ExportJob
from convmixer_tf.export.verify import Runner, verify

_LAZY = {
    "export_saved_model": "convmixer_tf.export.saved_model",
    "export_tflite": "convmixer_tf.export.tflite",
    "op_names": "convmixer_tf.export.tflite",
    "export_onnx": "convmixer_tf.export.onnx",
}

__all__ = ["CALIBRATION_COUNT", "FORMATS", "VERIFY_COUNT", "ExportError", "ExportFormat", "ExportJob", "Runner",
           "check_formats", "export_formats", "export_onnx", "export_saved_model", "export_tflite", "op_names",
           "registry", "verify"]


def __getattr__(name):
    if name == "FORMATS":  # format name -> file or folder name inside the output folder
        return {fmt.name: fmt.filename for fmt in registry.formats()}
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_formats(formats: Sequence[str]) -> list:
    """Validates format names ("all" expands to every format); keeps order, drops repeats."""
    return [fmt.name for fmt in registry.resolve(formats)]


def export_formats(model, directory, formats: Sequence[str], calibration_data: Optional[str] = None,
                   preprocessing=None, raw_rgb: bool = True, nchw: bool = False, opset: Optional[int] = None,
                   log: Callable[[str], None] = lambda m: None, calibration_count: int = CALIBRATION_COUNT,
                   verify_count: int = VERIFY_COUNT, latency_runs: int = 10, class_names=None,
                   tflite_output: str = "probabilities") -> list:
    """Writes each format into `directory`, verifies it, returns one row per file.

    Args:
        model: a Keras ConvMixer (any input size: fixed to the preprocessing size here).
        directory: existing output directory.
        formats: registered format names (or "all").
        calibration_data: image folder or "tfds:NAME[:SPLIT]" for int8 calibration and
            the held-out check images; None uses synthetic images (flagged in rows).
        preprocessing: a `convmixer_tf.Preprocessing` (input size, mean/std); default
            the one stored with the model.
        raw_rgb: put (x/255 - mean)/std in every exported graph, so apps feed raw RGB.
        nchw: ONNX input as [N, 3, H, W].
        class_names: the labels of TFLite files and the report; default those stored with
            the model.
        tflite_output: "probabilities" (TFLite files end in a softmax) or "logits".

    Raises ExportError when a file cannot be made or fails verification; files
    already written stay in `directory` (the CLIs write into a staging directory).
    """
    from convmixer_tf.export.calibration import load_images
    from convmixer_tf.export.verify import keras_outputs

    chosen = registry.resolve(formats)
    job = prepare_job(model, preprocessing, raw_rgb, class_names, nchw=nchw, opset=opset,
                      tflite_output=tflite_output)
    calibrated = any(fmt.calibrated for fmt in chosen)
    count = verify_count + (calibration_count if calibrated else 0)
    images, source = load_images(calibration_data, job.info.preprocessing, count, raw_rgb=job.raw_rgb)
    if len(images) <= verify_count and calibrated:
        raise ValueError(f"{source}: {len(images)} images; int8 needs more than {verify_count} "
                         f"(the last {verify_count} are held out from calibration)")
    held_out, job.calibration, job.calibration_source = images[-verify_count:], images[:-verify_count], source
    reference = keras_outputs(job.model, held_out)
    inputs = f"{source}, last {len(held_out)} (held out from calibration)" if calibrated else source
    try:
        return [_export_one(fmt, job, directory, held_out, reference, inputs, latency_runs, log) for fmt in chosen]
    finally:
        job.close()


def prepare_job(model, preprocessing=None, raw_rgb: bool = True, class_names=None, **options) -> ExportJob:
    """The model at its export size (raw RGB in, when `raw_rgb`) and what goes with it."""
    from convmixer_tf import contract
    from convmixer_tf.model import rebuild

    info = contract.info_of(model)
    pre = preprocessing or info.preprocessing
    shape = model.input_shape[1:]
    if shape[0] is not None and shape[1] is not None:
        if shape[0] != shape[1]:
            raise ValueError(f"export needs a square input, the model takes {shape[:2]}")
        pre = dataclasses.replace(pre, input_size=shape[0])
    size = pre.input_size
    export_model = rebuild(model, (size, size, 3), preprocessing=(pre.mean, pre.std) if raw_rgb else None)
    info = info.replace(preprocessing=pre, class_names=tuple(class_names) if class_names else info.class_names)
    contract.attach(export_model, info)
    return ExportJob(export_model, info, raw_rgb=contract.has_preprocessing(export_model), **options)


def _export_one(fmt: ExportFormat, job: ExportJob, directory, held_out, reference, inputs, latency_runs, log) -> dict:
    path = os.path.join(os.fspath(directory), fmt.filename)
    log(f"  {fmt.name} -> {fmt.filename}")
    fmt.write(job, path)
    row = verify(path, job.model, held_out, tolerance=fmt.tolerance, name=fmt.name, latency_runs=latency_runs,
                 reference=reference, job=job)
    row["path"] = fmt.filename
    row["inputs"] = inputs
    row["input"] = "raw RGB 0-255" if job.raw_rgb else "normalised"
    if row.get("problem"):
        raise ExportError(f"{fmt.name}: {fmt.filename}: {row['problem']}")
    if not row["passed"]:
        raise ExportError(f"{fmt.name}: {fmt.filename} differs from Keras by {row['max_abs']:.3g} "
                          f"(tolerance {row['tolerance']})")
    return row
