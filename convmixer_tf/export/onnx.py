"""ONNX through tf2onnx, with exact GELU written as erf and every file checked.

TF's exact gelu lowers to Erfc, which tf2onnx 1.17 cannot convert; tf2onnx then logs
the failure and still writes a file that onnxruntime refuses. The graph here writes
GELU with Erf, and the file is only written after onnx.checker and onnxruntime have
both accepted it.
"""

from __future__ import annotations

import os
from typing import Optional

from convmixer_tf.export.graph import InferenceGraph
from convmixer_tf.export.tflite import ExportError, _write_atomic

DEFAULT_OPSET = 17
MAX_OPSET = 18  # tf2onnx 1.17
GELU_FORM = "erf"


def export_onnx(model, path, opset: int = DEFAULT_OPSET, nchw: bool = False, preprocessing=None,
                dynamic_batch: bool = True) -> str:
    """Converts `model` to ONNX; input `images` (NHWC, or NCHW with nchw=True), output `logits`.

    Example:
        >>> export_onnx(model, "model.onnx", nchw=True)  # doctest: +SKIP
        >>> onnxruntime.InferenceSession("model.onnx").run(["logits"], {"images": x_nchw})  # doctest: +SKIP
    """
    import tensorflow as tf
    import tf2onnx

    if not 13 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be between 13 and {MAX_OPSET} (tf2onnx 1.17), got {opset}")
    graph = InferenceGraph(model, preprocessing, depthwise="native", gelu=GELU_FORM, variables=True, affine="conv")
    shape = [None if dynamic_batch else 1, *model.input_shape[1:]]
    spec = (tf.TensorSpec(shape, tf.float32, name="images"),)

    @tf.function(input_signature=spec)
    def serving(images):
        return {"logits": tf.identity(graph(images), name="logits")}

    try:
        proto, _ = tf2onnx.convert.from_function(
            serving, input_signature=spec, opset=opset, inputs_as_nchw=["images"] if nchw else None)
    except Exception as err:
        raise ExportError(f"ONNX conversion failed: {' '.join(str(err).split())[:500]}") from None
    check_onnx(proto)
    _write_atomic(path, proto.SerializeToString())
    return os.fspath(path)


def check_onnx(proto) -> None:
    """onnx.checker plus an onnxruntime session: either refusing the model is an error."""
    import onnx
    import onnxruntime as ort

    known = {"", "ai.onnx"}
    foreign = sorted({f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in proto.graph.node
                      if n.domain not in known})
    if foreign:
        raise ExportError(f"tf2onnx left ops it could not convert: {', '.join(foreign)}")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ExportError(f"onnx.checker rejected the model: {' '.join(str(err).split())[:300]}") from None
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime cannot load the model: {' '.join(str(err).split())[:300]}") from None
