"""TFLite files (float32, float16, dynamic-range, full int8) with builtin ops only.

The graph is `InferenceGraph` with large depthwise kernels tiled (LiteRT's XNNPACK is
slow on them). It is traced once per tile layout and converted by TFLiteConverter with
builtin ops only, so an op without a builtin fails the conversion instead of silently
becoming a Flex op that plain LiteRT cannot run; the op list of every file is checked.
The float16 file is the float32 file with its weights stored in float16 (what the
converter's float16 quantisation writes), made from it without a second conversion.
"""

from __future__ import annotations

import collections
import functools
import math
import os
from typing import Callable, Iterable, Optional

import numpy as np

from convmixer_tf import outputs
from convmixer_tf.config import PIXEL_MAX
from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.export.base import ExportError, ExportFormat, runtime_path
from convmixer_tf.export.float16 import float16_weights
from convmixer_tf.export.metadata import packed_facts, with_metadata
from convmixer_tf.facts import facts_of

QUANTIZATIONS = (None, "float16", "dynamic", "int8")
# The tiled depthwise branch's layout (channel groups, most taps per tile), by file. Float
# activations of a whole block overflow a core's cache, so float files run the branch on
# channel slices small enough to stay in it, with tiles XNNPACK runs in one pass (<= 9
# taps). Quantised files (int8 activations a quarter the size; dynamic-range hybrid
# kernels, which XNNPACK does not run) gain nothing from slices and lose on every extra
# op: one group, tiles of up to 25 taps, half the per-channel parameters. bench_export
# measures both.
TILING = {"float": (4, 9), "quantized": (1, 25)}
# The output of full-integer files: quantised uint8, which MediaPipe reads with the file's
# scale and zero point (it refuses int8 outputs).
INT8_OUTPUT = "uint8"


def export_tflite(
    model,
    path,
    quantization: Optional[str] = None,
    *,
    representative_data: Optional[Callable[[], Iterable[np.ndarray]]] = None,
    batch_size: int = 1,
    tiled_depthwise: bool = True,
    output: str = "probabilities",
) -> str:
    """Converts `model` to a .tflite file of builtin ops, with TFLite metadata.

    Args:
        model: a Keras ConvMixer with a fixed input size.
        path: file to write.
        quantization: None (float32), "float16", "dynamic" (int8 weights) or "int8"
            (full integer: int8 weights and activations, uint8 input when the graph
            takes raw pixels, int8 otherwise; uint8 output).
        representative_data: for "int8": a callable returning an iterable of single
            NHWC float32 samples (batch 1) in the file's input space.
        batch_size: fixed batch of the file.
        tiled_depthwise: emit k x k depthwise convolutions (k > 5) as the small tiles of
            `graph.tile_plan` (XNNPACK is slow on large depthwise kernels).
        output: "probabilities" (a softmax at the end, what apps show) or "logits".

    The labels packed into the file are the class names of the model's facts.

    A model that takes normalised input gets the normalisation of raw RGB into its graph
    with `rebuild(model, preprocessing=(mean, std))` first.

    Example:
        >>> export_tflite(model, "model.tflite")  # doctest: +SKIP
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int8" and representative_data is None:
        raise BadInput("int8 quantization needs representative_data (calibration images)")
    if None in model.input_shape[1:]:
        raise BadInput(
            f"TFLite export needs a fixed input size; the model takes {model.input_shape[1:]}: "
            "rebuild it with input_shape=(H, W, 3)"
        )
    traced = trace(
        model,
        _tiling(facts_of(model).config.dim, quantization),
        batch_size=batch_size,
        tiled_depthwise=tiled_depthwise,
        output=output,
    )
    return write_file(path, traced, convert(traced, quantization, representative_data))


def _tiling(dim: int, quantization) -> tuple:
    """The tile layout of a file (see TILING) of a model `dim` channels wide."""
    groups, taps = TILING["float" if quantization in (None, "float16") else "quantized"]
    return math.gcd(dim, groups), taps


# A traced inference graph (its concrete function and the variables it reads), the model it
# comes from and what it gives ("probabilities" or "logits"), which its files' metadata say.
Traced = collections.namedtuple("Traced", "function module model output")


def trace(model, layout, *, batch_size=1, tiled_depthwise=True, output="probabilities") -> Traced:
    """The inference graph of `model` (its facts' class names go into the files' labels)
    with tile layout (groups, taps), traced once: every file of that layout is converted
    from it."""
    import tensorflow as tf

    from convmixer_tf.export.graph import InferenceGraph

    groups, taps = layout
    graph = InferenceGraph(
        model,
        depthwise="tiled" if tiled_depthwise else "native",
        channel_groups=groups,
        tile_taps=taps,
        probabilities=output == "probabilities",
    )
    output = "probabilities" if graph.softmax else "logits"
    spec = tf.TensorSpec([batch_size, *model.input_shape[1:]], tf.float32, name="images")
    serving = tf.function(lambda images: {output: graph(images)}, input_signature=[spec])
    module = tf.Module()
    module.weights = graph.tf_variables
    return Traced(serving.get_concrete_function(), module, model, output)


def write_file(path, traced: Traced, flatbuffer: bytes) -> str:
    """Writes a converted flatbuffer as a .tflite file, with metadata, atomically, once
    its op list holds builtin ops only."""
    check_builtin_ops(flatbuffer)
    outputs.write_atomic(path, with_metadata(flatbuffer, traced.model, traced.output))
    return os.fspath(path)


def convert(traced: Traced, quantization=None, representative_data=None) -> bytes:
    """The flatbuffer of `traced` (builtin ops only): float32, "dynamic", "int8" (calibrated
    on `representative_data`), or "float16": the float32 one with its weights in float16."""
    import tensorflow as tf

    if quantization == "float16":
        return float16_weights(convert(traced))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([traced.function], traced.module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization in ("dynamic", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "int8":
        raw_rgb = facts_of(traced.model).raw_rgb
        converter.representative_dataset = lambda: _calibration_samples(
            representative_data, raw_rgb
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if raw_rgb else tf.int8
        converter.inference_output_type = getattr(tf, INT8_OUTPUT)
    try:
        return converter.convert()
    except Exception as err:
        raise ExportError(f"TFLite conversion failed: {one_line(err)[:500]}") from None


def _calibration_samples(representative_data, raw_rgb):
    """The converter's representative dataset. With raw RGB in, the first sample gets one
    black and one white pixel: the input's quantisation is then exactly scale 1, zero
    point 0, so an app's raw uint8 pixels are what the model expects."""
    for i, sample in enumerate(representative_data()):
        sample = np.array(sample, np.float32)
        if raw_rgb and i == 0:
            sample[0, 0, 0, :], sample[0, 0, 1, :] = 0.0, PIXEL_MAX
        yield [sample]


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
        raise ExportError(
            f"the TFLite file would need ops plain LiteRT cannot run: {', '.join(flex)}"
        )


class TFLiteRunner:
    """Runs a .tflite file in LiteRT on float32 NHWC batches; quantised inputs and
    outputs are (de)quantised with the file's own parameters. `output` is "probabilities"
    when the graph ends in a softmax; `input_shape` and `output_shape` are one image's."""

    def __init__(self, path, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        with runtime_path(path) as name:
            self._interpreter = Interpreter(model_path=name, num_threads=threads)
        self._interpreter.allocate_tensors()
        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1 or len(self._interpreter.get_output_details()) != 1:
            raise BadInput(
                f"{path}: the graph has {len(inputs)} inputs; an image classifier has one"
            )
        self._input = inputs[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_shape = tuple(int(n) for n in self._input["shape"][1:])
        self.output_shape = tuple(int(n) for n in self._output["shape"][1:])
        softmax, self.shown = _graph_shows(self._interpreter, self._input)
        self.output = "probabilities" if softmax else "logits"
        self.output_step = float(self._output["quantization"][0])  # 0 for a float output

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = int(self._input["shape"][0])
        return np.concatenate(
            [self._run(images[i : i + batch]) for i in range(0, len(images), batch)]
        )

    def _run(self, x):
        dtype = self._input["dtype"]
        if dtype != np.float32:  # quantised input: q = x / scale + zero_point
            scale, zero = self._input["quantization"]
            bounds = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), bounds.min, bounds.max).astype(dtype)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output["index"])
        if self._output["dtype"] != np.float32:
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


def _write(job, path, *, quantization):
    layout = _tiling(job.facts.config.dim, quantization)
    traced = job.shared(
        ("tflite", layout), lambda: trace(job.model, layout, output=job.tflite_output)
    )
    if quantization in (None, "float16"):  # one float32 conversion for both files
        float32 = job.shared(("tflite", layout, None), lambda: convert(traced))
        return write_file(
            path, traced, float32 if quantization is None else float16_weights(float32)
        )
    return write_file(path, traced, convert(traced, quantization, job.calibration_samples))


def _describe(path, check) -> dict:
    """Its ops, its labels, whether the GPU delegate takes it, and what MediaPipe makes of it."""
    from convmixer_tf.export.metadata import packed_labels, read_metadata
    from convmixer_tf.export.mobile import gpu_compatibility, mediapipe_check

    labels = packed_labels(path)
    row = {
        "ops": op_names(path),
        "metadata": read_metadata(path) is not None,
        "labels": len(labels) if labels is not None else None,
        "gpu_delegate": gpu_compatibility(path),
    }
    row["mediapipe"] = mediapipe_check(path, check, has_metadata=row["metadata"])
    if "problem" in row["mediapipe"]:
        row["problem"] = row["mediapipe"]["problem"]
    return row


# Which process writes each file when a run's files are written side by side: the float
# files share a traced graph and a conversion; the int8 file's calibration (single-threaded,
# seconds per image) is the longest task of all and gets a process to itself; the
# dynamic-range file (a short conversion) joins the main process's formats.
GROUPS = {None: "tflite-float", "float16": "tflite-float", "dynamic": "main", "int8": "tflite-int8"}


def _graph_shows(interpreter, image) -> tuple:
    """What the graph shows, from one read of its ops: whether the op that makes its output,
    past reshapes and (de)quantisation, is a softmax; and of its facts (`check_graph`): raw
    RGB in (uint8 in, or MUL and ADD before the first convolution) and the stem's width and
    patch ([dim, patch, patch, 3])."""
    ops = interpreter._get_ops_details()  # noqa: SLF001 - LiteRT's only view of the ops
    # a delegate's node stands for the ops it runs
    producers = {int(t): op for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]}
    op = producers.get(int(interpreter.get_output_details()[0]["index"]))
    for _ in producers:  # a walk back, as long as the graph at most
        if op is None or op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "RESHAPE"):
            break
        op = producers.get(int(op["inputs"][0]))
    softmax = op is not None and op["op_name"] == "SOFTMAX"
    names = [op["op_name"] for op in ops]
    if "CONV_2D" not in names:
        return softmax, {}
    first = names.index("CONV_2D")
    float_raw = set(names[:first]) - {"QUANTIZE", "DEQUANTIZE"} == {"MUL", "ADD"}
    raw = image["dtype"] == np.uint8 if image["dtype"] != np.float32 else float_raw
    shape = interpreter._get_tensor_details(int(ops[first]["inputs"][1]), 0)["shape"]
    if len(shape) != 4:
        return softmax, {"raw_rgb": raw}
    return softmax, {"raw_rgb": raw, "dim": int(shape[0]), "patch_size": int(shape[1])}


def _format(name, filename, quantization, summary, *, tolerance=None, aliases=()):
    return ExportFormat(
        name=name,
        filename=filename,
        summary=summary,
        write=functools.partial(_write, quantization=quantization),
        load=TFLiteRunner,
        tolerance=tolerance,
        aliases=aliases,
        calibrated=quantization == "int8",
        describe=_describe,
        group=GROUPS[quantization],
        facts=packed_facts,
    )


FORMATS = (
    _format(
        "tflite",
        "model.tflite",
        None,
        "TFLite float32, builtin ops only (LiteRT; XNNPACK on CPU)",
        tolerance=1e-4,
        aliases=("tflite_float32",),
    ),
    _format(
        "tflite_float16",
        "model_float16.tflite",
        "float16",
        "TFLite with float16 weights, marked for float16 inference",
        tolerance=1e-2,
        aliases=("tflite_fp16",),
    ),
    _format(
        "tflite_dynamic",
        "model_dynamic.tflite",
        "dynamic",
        "TFLite dynamic-range: int8 weights, float activations",
    ),
    _format(
        "tflite_int8",
        "model_int8.tflite",
        "int8",
        "TFLite full integer: int8 weights and activations, uint8 raw-RGB input (calibrated)",
    ),
)
