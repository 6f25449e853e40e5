"""Exporters: every format of `registry.FORMATS` (SavedModel, TFLite float32 / float16 /
dynamic / int8, ONNX float and int8), each file verified.

Every file is loaded back by its own runtime (tf.saved_model, LiteRT and MediaPipe,
onnxruntime) and compared with the Keras model before it counts as written. This module
is the package's face; the run is `export.run`. Importing it loads no TensorFlow; the
writers do, when called.
"""

from __future__ import annotations

from convmixer_tf.export import registry
from convmixer_tf.export.base import ExportError, ExportFormat, ExportJob
from convmixer_tf.export.calibration import CALIBRATION_COUNT, VERIFY_COUNT
from convmixer_tf.export.onnx import export_onnx
from convmixer_tf.export.report import format_rows, tie_note, top1_text
from convmixer_tf.export.run import ExportOptions, check_formats, export_formats, prepare_job
from convmixer_tf.export.saved_model import export_saved_model
from convmixer_tf.export.tflite import export_tflite, op_names
from convmixer_tf.export.verify import Runner, verify

__all__ = [
    "CALIBRATION_COUNT",
    "VERIFY_COUNT",
    "ExportError",
    "ExportFormat",
    "ExportJob",
    "ExportOptions",
    "Runner",
    "check_formats",
    "export_formats",
    "export_onnx",
    "export_saved_model",
    "export_tflite",
    "format_rows",
    "op_names",
    "prepare_job",
    "registry",
    "tie_note",
    "top1_text",
    "verify",
]
