"""int8 ONNX for CPU servers: the float ONNX file, quantised by onnxruntime's own tools
(`quant_pre_process`, then `quantize_static` in QDQ format, so other runtimes read it
too), calibrated on images held apart from the ones it is checked on.

The settings below were chosen by measurement (README, "int8 ONNX"): uint8 activations
and int8 weights (onnxruntime's u8s8 kernels) with 7-bit range, per-channel weight
scales, MinMax calibration, every op quantised, float logits.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.export.base import ExportError, ExportFormat
from convmixer_tf.export.onnx import (
    DEFAULT_OPSET,
    OnnxRunner,
    check_onnx,
    describe_itself,
    export_onnx,
    float_onnx,
    read_facts,
)
from convmixer_tf.facts import facts_of
from convmixer_tf.outputs import write_atomic
from convmixer_tf.temporaries import temporary_folder

CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
CALIBRATION_METHOD = "MinMax"
PER_CHANNEL = True
# Weights use 7 of their 8 bits: AVX2 CPUs without VNNI add pairs of uint8 x int8 products
# in int16 (vpmaddubsw), which saturates for large activations times large weights, and
# onnxruntime's documentation asks for reduce_range there. With it the file is accurate on
# every x86 CPU, VNNI or not (the README gives both settings' agreement and speed).
REDUCE_RANGE = True
# Op types left in float ("Gelu": every node of each exact GELU). None by default: a
# float GELU between quantised convolutions is not fused by onnxruntime and was slower.
FLOAT_OPS = ()
# Ops whose output stays float: the classifier head's logits, which a uint8 output would
# round to 1/255 of their range (its weights are int8 all the same).
FLOAT_OUTPUT_OPS = ("Gemm", "MatMul")


def export_onnx_int8(
    model,
    path,
    calibration: np.ndarray,
    *,
    nchw: bool = False,
    opset: int = DEFAULT_OPSET,
    method: str = CALIBRATION_METHOD,
    per_channel: bool = PER_CHANNEL,
    reduce_range: bool = REDUCE_RANGE,
    float_ops: Sequence[str] = FLOAT_OPS,
    float_path: Optional[str] = None,
) -> str:
    """Writes `model` as a statically quantised (QDQ, int8 weights, uint8 activations) ONNX file.

    Args:
        model: a Keras ConvMixer with a fixed input size.
        path: file to write.
        calibration: NHWC float32 images in the file's input space (raw RGB when the model
            has its preprocessing layer).
        nchw: input as [N, 3, H, W].
        method: "MinMax", "Entropy" or "Percentile" (onnxruntime's calibrators).
        per_channel: one weight scale per output channel (else per tensor).
        reduce_range: 7-bit weights (see REDUCE_RANGE).
        float_ops: op types left in float.
        float_path: the float ONNX file of `model` (same nchw and opset), when already
            written; else it is converted here.

    The model's facts go into the file.

    Example:
        >>> export_onnx_int8(model, "model_int8.onnx", calibration=images)  # doctest: +SKIP
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if calibration is None or not len(calibration):
        raise BadInput("int8 ONNX needs calibration images")
    with temporary_folder() as tmp:
        ready, quantised = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        if float_path is None:
            float_path = export_onnx(model, os.path.join(tmp, "float.onnx"), opset=opset, nchw=nchw)
        quant_pre_process(float_path, ready, skip_symbolic_shape=True)
        try:
            quantize_static(
                ready,
                quantised,
                _Reader(calibration, nchw),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                nodes_to_exclude=_nodes_of(ready, float_ops),
                extra_options={"OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OPS)},
            )
        except Exception as err:  # noqa: BLE001 - onnxruntime raises many kinds
            raise ExportError(f"onnxruntime quantisation failed: {one_line(err)[:400]}") from None
        import onnx

        proto = onnx.load(quantised)
        describe_itself(proto, facts_of(model))
        check_onnx(proto)
        write_atomic(path, proto.SerializeToString())
    return os.fspath(path)


class _Reader:
    """onnxruntime's CalibrationDataReader over an array of images, one per call."""

    def __init__(self, images, nchw):
        batches = np.asarray(images, np.float32)[:, None]  # batches of one image
        if nchw:
            batches = batches.transpose(0, 1, 4, 2, 3)
        self._feeds = ({"images": np.ascontiguousarray(x)} for x in batches)

    def get_next(self) -> Optional[dict]:
        return next(self._feeds, None)


def _nodes_of(path, op_types) -> list:
    """Names of the nodes to keep in float: those of `op_types`, and with "Gelu" in it,
    every node of each exact GELU (Div, Erf, Add, and both Muls)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    names = [node.name for node in graph.node if node.op_type in op_types]
    if "Gelu" in op_types:
        producer = {out: node for node in graph.node for out in node.output}
        consumers = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for erf in (node for node in graph.node if node.op_type == "Erf"):
            add = consumers[erf.output[0]][0]
            final = consumers[add.output[0]][0]
            half = next(producer[i] for i in final.input if i != add.output[0] and i in producer)
            names += [producer[erf.input[0]].name, erf.name, add.name, final.name, half.name]
    return names


def _write(job, path):
    export_onnx_int8(
        job.model,
        path,
        job.calibration,
        nchw=job.nchw,
        opset=job.opset or DEFAULT_OPSET,
        float_path=float_onnx(job),
    )


def _describe(path, check) -> dict:
    weights = "per-channel" if PER_CHANNEL else "per-tensor"
    bits = (
        "7-bit range (reduce_range): no saturation on AVX2 CPUs without VNNI, accurate on VNNI ones too"
        if REDUCE_RANGE
        else "full 8-bit range (may saturate on AVX2 CPUs without VNNI)"
    )
    return {
        "quantisation": f"QDQ; int8 {weights} weights, {bits}; uint8 activations, {CALIBRATION_METHOD} "
        f"calibration; float logits" + (f"; {', '.join(FLOAT_OPS)} in float" if FLOAT_OPS else "")
    }


FORMAT = ExportFormat(
    name="onnx_int8",
    filename="model_int8.onnx",
    aliases=("onnx_quantized",),
    summary="ONNX, int8 (onnxruntime static quantisation, QDQ) for CPU servers (calibrated)",
    write=_write,
    load=OnnxRunner,
    calibrated=True,
    describe=_describe,
    facts=read_facts,
)
