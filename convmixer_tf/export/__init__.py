"""Exporters: SavedModel, TFLite (float32/float16/dynamic/int8) and ONNX, each verified.

Every file is loaded back by its own runtime (tf.saved_model, LiteRT, onnxruntime)
and compared with the Keras model before it counts as written.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from convmixer_tf.export.saved_model import export_saved_model
from convmixer_tf.export.tflite import ExportError, export_tflite, export_tflite_files, op_names
from convmixer_tf.export.onnx import export_onnx
from convmixer_tf.export.verify import TOLERANCES, Runner, verify

# format -> file or directory name inside the output directory
FORMATS = {
    "saved_model": "saved_model",
    "tflite": "model.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_dynamic": "model_dynamic.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
}
CALIBRATION_COUNT = 64
VERIFY_COUNT = 8

__all__ = ["FORMATS", "ExportError", "Runner", "check_formats", "export_formats", "export_onnx",
           "export_saved_model", "export_tflite", "op_names", "verify"]


def check_formats(formats: Sequence[str]) -> list:
    """Validates format names ("all" expands to every format); keeps order, drops repeats."""
    out = []
    for name in formats:
        names = list(FORMATS) if name == "all" else [name]
        for n in names:
            if n not in FORMATS:
                raise ValueError(f"unknown export format {n!r}; allowed values: {', '.join(FORMATS)}, all")
            if n not in out:
                out.append(n)
    return out


def export_formats(model, directory, formats: Sequence[str], calibration_data: Optional[str] = None,
                   preprocessing=None, raw_rgb: bool = True, nchw: bool = False, opset: Optional[int] = None,
                   log: Callable[[str], None] = lambda m: None, calibration_count: int = CALIBRATION_COUNT,
                   verify_count: int = VERIFY_COUNT, latency_runs: int = 10) -> list:
    """Writes each format into `directory`, verifies it, returns one row per file.

    Args:
        model: a Keras ConvMixer (any input size: fixed to the preprocessing size here).
        directory: existing output directory.
        formats: names from FORMATS (or "all").
        calibration_data: image folder or "tfds:NAME[:SPLIT]" for int8 calibration and
            the held-out check images; None uses synthetic images (flagged in rows).
        preprocessing: a `convmixer_tf.Preprocessing` (input size, mean/std).
        raw_rgb: put (x/255 - mean)/std in every exported graph, so apps feed raw RGB.
        nchw: ONNX input as [N, 3, H, W].

    Raises ExportError when a file cannot be made or fails verification; files
    already written stay in `directory` (the CLIs write into a staging directory).
    """
    from convmixer_tf.config import Preprocessing
    from convmixer_tf.export.calibration import load_images
    from convmixer_tf.model import rebuild

    formats = check_formats(formats)
    pre = preprocessing or Preprocessing()
    shape = model.input_shape[1:]
    if shape[0] is not None and shape[1] is not None:
        if shape[0] != shape[1]:
            raise ValueError(f"export needs a square input, the model takes {shape[:2]}")
        pre = Preprocessing(shape[0], pre.crop_pct, pre.interpolation, pre.mean, pre.std)
    size = pre.input_size
    export_model = rebuild(model, (size, size, 3), preprocessing=(pre.mean, pre.std) if raw_rgb else None)
    raw = any(layer.name == "preprocessing" for layer in export_model.layers)

    needs_calibration = "tflite_int8" in formats
    count = verify_count + (calibration_count if needs_calibration else 0)
    images, source = load_images(calibration_data, pre, count, raw_rgb=raw)
    if len(images) <= verify_count and needs_calibration:
        raise ValueError(f"{source}: {len(images)} images; int8 needs more than {verify_count} "
                         f"(the last {verify_count} are held out from calibration)")
    held_out, calibration = images[-verify_count:], images[:-verify_count]
    reference = export_model.predict(held_out, verbose=0)

    tflite_targets = {os.path.join(os.fspath(directory), FORMATS[n]): (None if n == "tflite" else n.split("_", 1)[1])
                      for n in formats if n.startswith("tflite")}
    rows = []
    for name in formats:
        path = os.path.join(os.fspath(directory), FORMATS[name])
        log(f"  {name} -> {FORMATS[name]}")
        if name == "saved_model":
            export_saved_model(export_model, path)
        elif name == "onnx":
            export_onnx(export_model, path, nchw=nchw, **({"opset": opset} if opset else {}))
        elif tflite_targets:  # every TFLite file from one traced graph, on the first TFLite format
            export_tflite_files(export_model, tflite_targets,
                                representative_data=lambda: (img[None] for img in calibration))
            tflite_targets = {}
        row = verify(path, export_model, held_out, tolerance=TOLERANCES.get(name), name=name,
                     latency_runs=latency_runs, reference=reference)
        row["path"] = FORMATS[name]
        row["inputs"] = f"{source}, last {len(held_out)} (held out from calibration)" if needs_calibration else source
        row["input"] = "raw RGB 0-255" if raw else "normalised"
        if name.startswith("tflite"):
            row["ops"] = op_names(path)
        rows.append(row)
        if not row["passed"]:
            raise ExportError(f"{name}: {FORMATS[name]} differs from Keras by {row['max_abs']:.3g} "
                              f"(tolerance {row['tolerance']})")
    return rows
