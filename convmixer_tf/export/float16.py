"""The float16 TFLite file, made from the float32 one without a second conversion: every
float32 constant stored in float16 and read through a DEQUANTIZE op at the start, as the
converter's float16 quantisation writes it (the same ops, the same rounding), plus its
reduced-precision metadata."""

from __future__ import annotations

import numpy as np

from convmixer_tf.export.metadata import add_metadata

# The float16 file's reduced-precision metadata, as the converter writes it when told
# that float16 accumulation is acceptable: delegates that compute in float16 (XNNPACK on
# ARMv8.2, GPUs) may then run the whole network in it.
FLOAT16_PRECISION = b"fp16accfp16"


def float16_weights(flatbuffer: bytes) -> bytes:
    """A float32 .tflite flatbuffer with its float32 constants in float16 (see above)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    dequantize = _opcode(model, schema.BuiltinOperator.DEQUANTIZE)
    halves = {}  # float32 buffer -> its float16 copy (the converter shares equal buffers)
    front = []  # the DEQUANTIZE ops, run first
    for index, tensor in enumerate(list(graph.tensors)):
        data = model.buffers[tensor.buffer].data
        if tensor.type == schema.TensorType.FLOAT32 and data is not None and len(data):
            front.append(_read_as_float16(model, index, halves, dequantize))
    still_read = {
        tensor.buffer for tensor in graph.tensors
    }  # equal bytes of another type share a buffer
    for old in set(halves) - still_read:
        model.buffers[old].data = None
    graph.operators = front + list(graph.operators)
    add_metadata(model, "reduced_precision_support", FLOAT16_PRECISION)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _read_as_float16(model, index: int, halves: dict, dequantize: int):
    """Stores constant tensor `index` as a float16 copy (shared per buffer through `halves`)
    and returns the DEQUANTIZE op that fills the float32 tensor from it at run time."""
    from tensorflow.lite.python import schema_py_generated as schema

    graph = model.subgraphs[0]
    tensor = graph.tensors[index]
    if tensor.buffer not in halves:
        data = np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.float32)
        model.buffers.append(schema.BufferT())
        model.buffers[-1].data = np.frombuffer(data.astype(np.float16).tobytes(), np.uint8)
        halves[tensor.buffer] = len(model.buffers) - 1
    half = schema.TensorT()
    half.name = tensor.name
    half.shape = tensor.shape
    half.type = schema.TensorType.FLOAT16
    half.buffer = halves[tensor.buffer]
    tensor.buffer = 0  # buffer 0: empty; filled at run time
    graph.tensors.append(half)
    op = schema.OperatorT()
    op.opcodeIndex = dequantize
    op.inputs = [len(graph.tensors) - 1]
    op.outputs = [index]
    return op


def _opcode(model, builtin) -> int:
    """The index of `builtin`'s operator code in `model`, added when it has none."""
    from tensorflow.lite.python import schema_py_generated as schema

    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = builtin
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1
