"""TFLite files (float32, float16, dynamic-range, full int8) with builtin ops only.

The graph is `InferenceGraph` with large depthwise kernels tiled (LiteRT's XNNPACK is
slow on them) and, in float files, the depthwise branch run in channel groups. It goes
through a SavedModel and TFLiteConverter with builtin ops only, so an op without a
builtin fails the conversion instead of silently becoming a Flex op that plain LiteRT
cannot run. The op list of every file is checked.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Callable, Iterable, Optional

import numpy as np

from convmixer_tf.export.graph import InferenceGraph
from convmixer_tf.model import config_from_model

QUANTIZATIONS = (None, "float16", "dynamic", "int8")
# How the tiled depthwise branch is laid out (InferenceGraph), by file type:
# (channel groups, most taps per tile). Float files take 3x3-sized tiles (XNNPACK's
# fastest depthwise kernel) in channel groups: 768/32 took 125 ms with 1 group, 114 with
# 2, 112 with 4, 122 with 8 (1536/20: 324, 267 with 4, 280 with 8). int8 activations are
# a quarter the size and stay in cache without groups; int8 files take tiles of up to 25
# taps, as fast there (768/32: 47.1 ms vs 47.2 ms) in half as many convolutions, each of
# which stores per-channel scales and zero points for its kernel and bias
# (768/32: 23.4 MB instead of 25.3 MB).
TILING = {"float": (4, 9), "int8": (1, 25)}


class ExportError(RuntimeError):
    """An export produced no valid file (the message says why)."""


def export_tflite(model, path, quantization: Optional[str] = None,
                  representative_data: Optional[Callable[[], Iterable[np.ndarray]]] = None,
                  preprocessing=None, batch_size: int = 1, tiled_depthwise: bool = True) -> str:
    """Converts `model` to a .tflite file of builtin ops.

    Args:
        model: a Keras ConvMixer with a fixed input size.
        path: file to write.
        quantization: None (float32), "float16", "dynamic" (int8 weights) or "int8"
            (full integer: int8 weights and activations, uint8 input when the graph
            takes raw pixels, int8 otherwise; int8 output).
        representative_data: for "int8": a callable returning an iterable of single
            NHWC float32 samples (batch 1) in the file's input space.
        preprocessing: (mean, std) to bake raw 0-255 RGB -> normalised input into the graph.
        batch_size: fixed batch of the file.
        tiled_depthwise: emit k x k depthwise convolutions (k > 5) as the small tiles of
            `graph.tile_plan` (XNNPACK is slow on large depthwise kernels).

    Example:
        >>> export_tflite(model, "model.tflite")  # doctest: +SKIP
    """
    return export_tflite_files(model, {path: quantization}, representative_data, preprocessing,
                               batch_size, tiled_depthwise)[0]


def export_tflite_files(model, targets, representative_data=None, preprocessing=None, batch_size: int = 1,
                        tiled_depthwise: bool = True) -> list:
    """Writes several .tflite files ({path: quantization}), tracing the graph once per tile size."""
    import tensorflow as tf

    for quantization in targets.values():
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if quantization == "int8" and representative_data is None:
            raise ValueError("int8 quantization needs representative_data (calibration images)")
    shape = model.input_shape[1:]
    if None in shape:
        raise ValueError(f"TFLite export needs a fixed input size; the model takes {shape}: "
                         "rebuild it with input_shape=(H, W, 3)")
    written = []
    dim = config_from_model(model).dim

    def tiling(quantization):
        groups, taps = TILING["int8" if quantization == "int8" else "float"]
        return math.gcd(dim, groups), taps

    for groups, taps in sorted({tiling(q) for q in targets.values()}):  # one traced graph per layout
        group = {p: q for p, q in targets.items() if tiling(q) == (groups, taps)}
        graph = InferenceGraph(model, preprocessing, depthwise="tiled" if tiled_depthwise else "native",
                               variables=True, channel_groups=groups, tile_taps=taps)
        fn = tf.function(graph, input_signature=[tf.TensorSpec([batch_size, *shape], tf.float32, name="images")])
        with tempfile.TemporaryDirectory() as tmp:
            module = tf.Module()
            module.weights = graph.tf_variables
            tf.saved_model.save(module, tmp, signatures={"serving_default": _named_output(fn)})
            for path, quantization in group.items():
                flatbuffer = _convert(tmp, quantization, representative_data, graph.raw_rgb)
                check_builtin_ops(flatbuffer)
                _write_atomic(path, flatbuffer)
                written.append(os.fspath(path))
    return written


def _convert(saved_model_dir, quantization, representative_data, raw_rgb) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([np.asarray(s, np.float32)] for s in representative_data())
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if raw_rgb else tf.int8
        converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    except Exception as err:
        raise ExportError(f"TFLite conversion failed: {' '.join(str(err).split())[:500]}") from None


def _named_output(fn):
    import tensorflow as tf

    @tf.function(input_signature=fn.input_signature)
    def serving(images):
        return {"logits": fn(images)}

    return serving.get_concrete_function()


def op_names(flatbuffer_or_path) -> list:
    """The distinct op names of a .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(flatbuffer_or_path, (bytes, bytearray)):
        interpreter = Interpreter(model_content=bytes(flatbuffer_or_path))
    else:
        interpreter = Interpreter(model_path=os.fspath(flatbuffer_or_path))
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def check_builtin_ops(flatbuffer) -> None:
    flex = [name for name in op_names(flatbuffer) if name.startswith("Flex") or name == "CUSTOM"]
    if flex:
        raise ExportError(f"the TFLite file would need ops plain LiteRT cannot run: {', '.join(flex)}")


def _write_atomic(path, data: bytes):
    path = os.fspath(path)
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
