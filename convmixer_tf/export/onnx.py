"""ONNX through tf2onnx, with exact GELU written as erf and every file checked.

TF's exact gelu lowers to Erfc, which tf2onnx 1.17 cannot convert; tf2onnx then logs
the failure and still writes a file that onnxruntime refuses. The graph here writes
GELU with Erf, and the file is only written after onnx.checker and onnxruntime have
both accepted it.
"""

from __future__ import annotations

import os

from convmixer_tf import contract
from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.export.base import ExportError, ExportFormat
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
    info=None,
) -> str:
    """Converts `model` (facts `info`, default its own) to ONNX; input `images` (NHWC, or
    NCHW with nchw=True), output `logits`.

    Example:
        >>> export_onnx(model, "model.onnx", nchw=True)  # doctest: +SKIP
        >>> onnxruntime.InferenceSession("model.onnx").run(["logits"], {"images": x_nchw})  # doctest: +SKIP
    """
    import tensorflow as tf
    import tf2onnx

    from convmixer_tf.export.graph import InferenceGraph

    check_opset(opset)
    graph = InferenceGraph(model, info=info, depthwise="native", gelu=GELU_FORM, affine="conv")
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
    describe_itself(proto, info or contract.info_of(model))
    check_onnx(proto)
    write_atomic(path, proto.SerializeToString())
    return os.fspath(path)


def check_opset(opset: int) -> None:
    if not 13 <= opset <= MAX_OPSET:
        raise BadInput(f"opset must be between 13 and {MAX_OPSET} (tf2onnx 1.17), got {opset}")


def describe_itself(proto, info) -> None:
    """The model's facts in the file: metadata_props[INFO_MEMBER], which onnxruntime reads
    as get_modelmeta().custom_metadata_map (docs/try-it.md describes the keys)."""
    for prop in list(proto.metadata_props):
        if prop.key == contract.INFO_MEMBER:
            proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=contract.INFO_MEMBER, value=contract.facts_json(info))


def read_facts(path):
    """The facts an ONNX file carries, or None (written before files carried them)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    text = next((p.value for p in model.metadata_props if p.key == contract.INFO_MEMBER), None)
    return None if text is None else contract.facts_from_json(text, path)


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

    known = {"", "ai.onnx"}
    foreign = sorted(
        {
            f"{n.domain}:{n.op_type}" if n.domain else n.op_type
            for n in proto.graph.node
            if n.domain not in known
        }
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
    """Runs an .onnx file in onnxruntime (CPU) on NHWC float32 batches (NCHW files get them transposed)."""

    output = "logits"

    def __init__(self, path, threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            os.fspath(path), options, providers=["CPUExecutionProvider"]
        )
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._nchw = len(inp.shape) == 4 and inp.shape[1] == 3 and inp.shape[3] != 3
        self._output = self._session.get_outputs()[0].name

    def __call__(self, images):
        import numpy as np

        x = images.transpose(0, 3, 1, 2) if self._nchw else images
        return self._session.run([self._output], {self._input: np.ascontiguousarray(x)})[0]


def float_onnx(job) -> str:
    """The job's float ONNX file, converted once per run: the onnx and onnx_int8 formats
    both start from it."""

    def convert():
        path = os.path.join(job.scratch(), f"float-{'nchw' if job.nchw else 'nhwc'}.onnx")
        return export_onnx(
            job.model, path, job.opset or DEFAULT_OPSET, nchw=job.nchw, info=job.info
        )

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
    recognises=lambda path: (
        os.fspath(path).endswith(".onnx") and not os.fspath(path).endswith("_int8.onnx")
    ),
    facts=read_facts,
)
