"""ONNX through tf2onnx, with exact GELU written as erf and every file checked.

TF's exact gelu lowers to Erfc, which tf2onnx 1.17 cannot convert; tf2onnx then logs
the failure and still writes a file that onnxruntime refuses. The graph here writes
GELU with Erf, and the file is only written after onnx.checker and onnxruntime have
both accepted it.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.export.base import ExportError, ExportFormat, runtime_path
from convmixer_tf.facts import FACTS_FILE, FACTS_LIMIT, Facts, facts_of
from convmixer_tf.outputs import write_atomic
from convmixer_tf.temporaries import environment

DEFAULT_OPSET = 17
MAX_OPSET = 18  # tf2onnx 1.17
GELU_FORM = "erf"


def export_onnx(
    model,
    path,
    opset: int = DEFAULT_OPSET,
    *,
    nchw: bool = False,
    dynamic_batch: bool = True,
) -> str:
    """Converts `model` to ONNX, its facts inside; input `images` (NHWC, or NCHW with
    nchw=True), output `logits`.

    Example:
        >>> export_onnx(model, "model.onnx", nchw=True)  # doctest: +SKIP
        >>> onnxruntime.InferenceSession("model.onnx").run(["logits"], {"images": x_nchw})  # doctest: +SKIP
    """
    import tensorflow as tf
    import tf2onnx

    from convmixer_tf.export.graph import InferenceGraph

    check_opset(opset)
    graph = InferenceGraph(model, depthwise="native", gelu=GELU_FORM, affine="conv")
    shape = [None if dynamic_batch else 1, *model.input_shape[1:]]
    spec = (tf.TensorSpec(shape, tf.float32, name="images"),)

    @tf.function(input_signature=spec)
    def serving(images):
        return {"logits": tf.identity(graph(images), name="logits")}

    # Any value of TF2ONNX_CATCH_ERRORS turns off tf2onnx's habit of deep-copying the whole
    # graph, weights included, before each of its optimisers (to undo one that fails): an
    # optimiser that fails fails the export here, and the file is checked anyway.
    try:
        with environment(TF2ONNX_CATCH_ERRORS="false"):
            proto, _ = tf2onnx.convert.from_function(
                serving,
                input_signature=spec,
                opset=opset,
                inputs_as_nchw=["images"] if nchw else None,
            )
    except Exception as err:
        raise ExportError(f"ONNX conversion failed: {one_line(err)[:500]}") from None
    _gelu_in_fusable_form(proto)
    describe_itself(proto, facts_of(model))
    check_onnx(proto)
    write_atomic(path, proto.SerializeToString())
    return os.fspath(path)


def check_opset(opset: int) -> None:
    if not 13 <= opset <= MAX_OPSET:
        raise BadInput(f"opset must be between 13 and {MAX_OPSET} (tf2onnx 1.17), got {opset}")


def describe_itself(proto, facts) -> None:
    """The model's facts in the file: metadata_props[FACTS_FILE], which onnxruntime reads
    as get_modelmeta().custom_metadata_map (docs/try-it.md describes the keys)."""
    for prop in list(proto.metadata_props):
        if prop.key == FACTS_FILE:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=FACTS_FILE, value=facts.to_json())


def read_facts(path):
    """The facts an ONNX file carries (its metadata_props entry), or None for a file that
    carries none. Read from the file's own bytes, skipping the weights: neither the onnx
    package nor a session is needed (nor TensorFlow, which onnx does not need either)."""
    with _mapped(path) as data:
        for number, span in _fields(data, 0, len(data)):
            if number == 14 and isinstance(span, tuple):  # ModelProto.metadata_props
                entry = dict(_fields(data, *span))  # StringStringEntryProto: key 1, value 2
                if _text(data, entry.get(1)) == FACTS_FILE.encode():
                    return Facts.from_json(_text(data, entry.get(2), path), path)
    return None


def graph_shows(path) -> tuple:
    """What the graph shows beyond what onnxruntime tells, in one pass over the file: whether
    its first output comes from a Softmax (past identities, reshapes, (de)quantisers), and
    the stem's width and patch from its first Conv's weight ([dim, 3, patch, patch]; an int8
    file's past its DequantizeLinear) for `model_file.check_graph`, or an empty dict."""
    index = _graph_index(path)
    return _ends_in_softmax(index), _stem_facts(index)


def _graph_index(path):
    """One pass over the graph: (producers, first output, each Conv's inputs, weights' dims)."""
    with _mapped(path) as data:
        graph = next((span for number, span in _fields(data, 0, len(data)) if number == 7), None)
        producers, weights = {}, {}
        output, convs = None, []
        if not isinstance(graph, tuple):
            return producers, output, convs, weights
        for number, span in _fields(data, *graph):
            if number == 1 and isinstance(span, tuple):  # GraphProto.node
                node = [(n, _text(data, v)) for n, v in _fields(data, *span) if n in (1, 2, 4)]
                inputs = [value for n, value in node if n == 1]
                op_type = next((value for n, value in node if n == 4), b"")
                producers.update({value: (op_type, inputs) for n, value in node if n == 2})
                convs += [inputs] if op_type == b"Conv" else []
            elif number == 5 and isinstance(span, tuple):  # GraphProto.initializer
                tensor = list(_fields(data, *span))
                weights[_text(data, dict(tensor).get(8))] = _tensor_dims(data, tensor)
            elif number == 12 and isinstance(span, tuple) and output is None:  # GraphProto.output
                output = _text(data, dict(_fields(data, *span)).get(1))
    return producers, output, convs, weights


def _ends_in_softmax(index) -> bool:
    producers, output, _, _ = index
    op_type, inputs = producers.get(output, (b"", []))
    for _ in producers:  # a walk back, as long as the graph at most (a cycle ends it too)
        if op_type not in _PASSING or not inputs:
            break
        op_type, inputs = producers.get(inputs[0], (b"", []))
    return op_type == b"Softmax"


def _stem_facts(index) -> dict:
    producers, _, convs, weights = index
    if not convs or len(convs[0]) < 2:
        return {}
    weight = convs[0][1]
    dims = weights.get(weight) or weights.get((producers.get(weight, (b"", [b""]))[1] or [b""])[0])
    if not dims or len(dims) != 4 or dims[1] != 3:
        return {}
    return {"dim": dims[0], "patch_size": dims[2]}


def _tensor_dims(data, tensor) -> list:
    """TensorProto.dims (field 1: one varint each, or packed)."""
    dims = []
    for number, value in tensor:
        if number == 1 and isinstance(value, int):
            dims.append(value)
        elif number == 1 and isinstance(value, tuple):
            at = value[0]
            while at < value[1]:
                size, at = _varint(data, at, value[1])
                dims.append(size)
    return dims


_PASSING = {b"Identity", b"Reshape", b"Flatten", b"Squeeze", b"QuantizeLinear", b"DequantizeLinear"}


@contextlib.contextmanager
def _mapped(path):
    """The bytes of the file at `path`, mapped (a model's weights are never read)."""
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path} is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def _fields(data, start: int, end: int):
    """(field number, value) of each field of the protobuf message in data[start:end]: an
    int for a varint, (start, end) of the bytes of a length-delimited field, None for a
    fixed-width one; BadInput naming where the bytes stop being a message."""
    at = start
    while at < end:
        key, at = _varint(data, at, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at, end)
        elif wire == 2:
            size, at = _varint(data, at, end)
            value, at = (at, at + size), at + size
        elif wire in (1, 5):
            value, at = None, at + (8 if wire == 1 else 4)
        else:
            raise BadInput(f"not an ONNX file: protobuf wire type {wire} at byte {at}")
        if at > end:
            raise BadInput(f"not an ONNX file, or truncated: a field runs past byte {end}")
        yield number, value


def _varint(data, at: int, end: int):
    value = shift = 0
    while shift < 64:
        if at >= end:
            break
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if byte < 0x80:
            return value, at
    raise BadInput(f"not an ONNX file, or truncated: no whole number at byte {at}")


def _text(data, span, where=None) -> bytes:
    """The bytes of a length-delimited field (b"" for a missing or wrong-typed one)."""
    if not isinstance(span, tuple):
        return b""
    if where is not None and span[1] - span[0] > FACTS_LIMIT:
        raise BadInput(f"{where}: its {FACTS_FILE} is larger than {FACTS_LIMIT} bytes")
    return data[span[0] : span[1]]


def _gelu_in_fusable_form(proto) -> int:
    """Writes each erf GELU the way onnxruntime recognises it; returns how many.

    onnxruntime fuses x * 0.5 * (1 + erf(x / sqrt 2)) into one Gelu kernel only from
    Div(x, sqrt 2) -> Erf -> Add(erf, 1) with scalar constants: TF's constant folding
    turns the division into Mul(x, 1/sqrt 2), and its Add comes as Add(1, erf) with a
    [1,1,1,1] constant. Unfused, each GELU runs as five elementwise ops, each leaving
    onnxruntime's blocked NCHWc layout and coming back. Both rewrites are exact up to one
    rounding of x / sqrt 2 (the file is checked against Keras afterwards).
    """
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    scalars = {
        t.name: numpy_helper.to_array(t) for t in graph.initializer if int(np.prod(t.dims)) == 1
    }
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten = sum(_rewrite_gelu(graph, i, scalars, consumers) for i in range(len(graph.node)))
    if rewritten:
        graph.initializer.append(
            numpy_helper.from_array(np.array(2.0**0.5, np.float32), GELU_SQRT2)
        )
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), GELU_ONE))
        used = {name for node in graph.node for name in node.input}
        used |= {out.name for out in graph.output}
        kept = [t for t in graph.initializer if t.name in used]  # drop the constants replaced above
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


GELU_SQRT2 = "gelu_sqrt2"  # the scalar constants the fusable form reads
GELU_ONE = "gelu_one"


def _rewrite_gelu(graph, i: int, scalars: dict, consumers: dict) -> bool:
    """Rewrites node `i` when it is the Mul(x, 1/sqrt 2) of an exact GELU (and its Add(1,
    erf)) into the fusable form; True when it was."""
    import numpy as np
    from onnx import helper

    node = graph.node[i]
    if node.op_type != "Mul" or len(node.input) != 2:
        return False
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Erf":
        return False

    def is_inverse_sqrt2(name):
        value = scalars.get(name)
        return (
            value is not None
            and value.dtype == np.float32
            and abs(float(value.ravel()[0]) - 0.5**0.5) < 1e-7
        )

    const = [name for name in node.input if is_inverse_sqrt2(name)]
    if len(const) != 1:
        return False
    x = node.input[1] if node.input[0] == const[0] else node.input[0]
    div = helper.make_node(
        "Div", [x, GELU_SQRT2], list(node.output), name=node.name or f"gelu_div_{i}"
    )
    graph.node[i].CopyFrom(div)
    erf = users[0]
    for add in consumers.get(erf.output[0], []):
        other = [name for name in add.input if name != erf.output[0]]
        one_added = (
            len(other) == 1 and other[0] in scalars and float(scalars[other[0]].ravel()[0]) == 1
        )
        if add.op_type == "Add" and one_added:
            add.input[0] = erf.output[0]  # Add(erf, scalar 1)
            add.input[1] = GELU_ONE
    return True


def check_onnx(proto) -> None:
    """onnx.checker plus an onnxruntime session: either refusing the model is an error."""
    import onnx
    import onnxruntime as ort

    foreign = sorted(
        {f"{n.domain}:{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    )
    if foreign:
        raise ExportError(f"tf2onnx left ops it could not convert: {', '.join(foreign)}")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ExportError(f"onnx.checker rejected the model: {one_line(err)[:300]}") from None
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"onnxruntime cannot load the model: {one_line(err)[:300]}") from None


class OnnxRunner:
    """Runs an .onnx file in onnxruntime (CPU) on NHWC float32 batches (NCHW files get them
    transposed). `output` is "probabilities" when the graph ends in a softmax;
    `input_shape` and `output_shape` are one image's (NHWC; None for a free size)."""

    def __init__(self, path, threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        with runtime_path(path) as name:
            self._session = ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
            taken = ", ".join(f"{i.type} {_dims(i.shape)}" for i in inputs)
            raise BadInput(f"{path}: the graph takes {taken}, not a batch of float32 images")
        inp = inputs[0]
        self._input = inp.name
        self._nchw = inp.shape[1] == 3 and inp.shape[3] != 3
        shape = [_size(n) for n in inp.shape[1:]]
        self.input_shape = tuple(shape[1:] + shape[:1] if self._nchw else shape)
        self._output = self._session.get_outputs()[0].name
        self.output_shape = tuple(_size(n) for n in self._session.get_outputs()[0].shape[1:])
        softmax, self.shown = graph_shows(path)
        self.output = "probabilities" if softmax else "logits"

    def __call__(self, images):
        import numpy as np

        x = images.transpose(0, 3, 1, 2) if self._nchw else images
        return self._session.run([self._output], {self._input: np.ascontiguousarray(x)})[0]


def _size(dim):
    """A dimension of an onnxruntime shape: its size, or None when it is free (a name)."""
    return dim if isinstance(dim, int) else None


def _dims(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def float_onnx(job) -> str:
    """The job's float ONNX file, converted once per run: the onnx and onnx_int8 formats
    both start from it."""

    def convert():
        path = os.path.join(job.scratch(), f"float-{'nchw' if job.nchw else 'nhwc'}.onnx")
        return export_onnx(job.model, path, job.opset or DEFAULT_OPSET, nchw=job.nchw)

    return job.shared(("onnx", job.nchw, job.opset), convert)


def _write(job, path):
    with open(float_onnx(job), "rb") as f:
        write_atomic(path, f.read())


FORMAT = ExportFormat(
    name="onnx",
    filename="model.onnx",
    summary="ONNX for onnxruntime and other runtimes (exact GELU as erf); NHWC input, NCHW with --nchw",
    write=_write,
    load=OnnxRunner,
    tolerance=1e-4,
    facts=read_facts,
)
