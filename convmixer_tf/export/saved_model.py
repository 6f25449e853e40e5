"""SavedModel with a serving signature: input `images`, output `logits`, dynamic batch."""

from __future__ import annotations

import os

from convmixer_tf.errors import BadInput
from convmixer_tf.export.base import ExportFormat, runtime_path
from convmixer_tf.facts import FACTS_FILE, Facts, facts_of, file_bytes
from convmixer_tf.outputs import follow_umask
from convmixer_tf.temporaries import temporary_folder


def export_saved_model(model, path) -> str:
    """Writes `model` as a TensorFlow SavedModel directory.

    The `serving_default` signature takes `images` (float32, [batch, H, W, 3], batch
    dynamic) and returns {"logits": ...}: raw RGB pixels when the model takes them (its
    preprocessing layer; `rebuild(model, preprocessing=(mean, std))` adds one). The model's
    facts go with it as the asset `assets/convmixer.json`.

    Example:
        >>> export_saved_model(model, "out/saved_model")  # doctest: +SKIP
        >>> tf.saved_model.load("out/saved_model").signatures["serving_default"](images=x)["logits"]  # doctest: +SKIP
    """
    import tensorflow as tf

    shape = [None] + list(model.input_shape[1:])

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    def serving(images):
        return {"logits": model(images, training=False)}

    # keras.export.ExportArchive stores every weight twice (the Keras wrapper and the
    # tf.Variable the trace captures; keras-team/keras#23553). Tracking the very
    # tf.Variables the trace captures lets the checkpoint de-duplicate them.
    module = tf.Module()
    module.weights = [getattr(v, "value", v) for v in model.weights]
    signature = serving.get_concrete_function()
    module.serving = serving
    with temporary_folder() as folder:
        asset = os.path.join(folder, FACTS_FILE)  # the asset keeps its file's name
        with open(asset, "w") as f:
            f.write(facts_of(model).to_json())
        module.facts = tf.saved_model.Asset(asset)
        tf.saved_model.save(module, os.fspath(path), signatures={"serving_default": signature})
    follow_umask(path)  # TensorFlow makes its folders 0755 whatever the umask
    return os.fspath(path)


def is_saved_model(path) -> bool:
    """A SavedModel is a folder, of any name, that holds saved_model.pb (of any kind: one
    that is not a regular file is named when it is opened, `check_members`)."""
    return os.path.lexists(os.path.join(path, "saved_model.pb"))


def read_facts(path):
    """The facts a SavedModel carries (its asset), or None."""
    data = file_bytes(os.path.join(os.fspath(path), "assets", FACTS_FILE))
    return None if data is None else Facts.from_json(data, path)


class SavedModelRunner:
    """Runs a SavedModel's `serving_default` (images -> logits) on NHWC float32 batches.
    `output` is "probabilities" when its graph ends in a softmax; `input_shape` and
    `output_shape` are one image's (None for a free size)."""

    def __init__(self, path, threads: int = 2):
        import tensorflow as tf

        check_members(path)
        with runtime_path(path) as name:
            loaded = tf.saved_model.load(name)
        signatures = loaded.signatures
        if "serving_default" not in signatures:
            raise BadInput(
                f"{path} has no serving_default signature: not a SavedModel written by this project"
            )
        self._fn = signatures["serving_default"]
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        if set(inputs) != {"images"} or "logits" not in outputs:
            raise BadInput(
                f"{path}: its serving_default takes {sorted(inputs)} and gives {sorted(outputs)}, "
                "not images -> logits"
            )
        self.input_shape = tuple(inputs["images"].shape[1:])
        self.output_shape = tuple(outputs["logits"].shape[1:])
        self.output = "probabilities" if _ends_in_softmax(self._fn) else "logits"
        self.shown = _stem_facts(loaded)

    def __call__(self, images):
        return self._fn(images=images)["logits"].numpy()


# The most entries a SavedModel folder may hold: one this project writes holds six.
MEMBERS_LIMIT = 10_000


def check_members(path) -> None:
    """BadInput naming the first entry of the SavedModel folder `path` that is not a regular
    file or a folder: TensorFlow's read of a FIFO (saved_model.pb, variables.index, ...)
    blocks forever, and a link may lead out of the folder. Nothing is opened."""
    pending, count = [os.fspath(path)], 0
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise BadInput(f"cannot read {folder}: {err.strerror or err}") from None
        count += len(entries)
        if count > MEMBERS_LIMIT:
            raise BadInput(f"{path} holds more than {MEMBERS_LIMIT} entries: not a SavedModel")
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif not entry.is_file(follow_symlinks=False):
                kind = "a link" if entry.is_symlink() else "not a regular file"
                raise BadInput(f"{entry.path} is {kind}: a SavedModel holds files and folders only")


def _stem_facts(loaded) -> dict:
    """What the graph shows of its facts: the stem's width and patch, from its kernel (the
    first 4-D weight, [patch, patch, 3, dim]) among those the module tracks."""
    weights = getattr(loaded, "weights", None)
    weights = weights if isinstance(weights, list) else []  # a foreign module's may be anything
    kernel = next((w for w in weights if len(getattr(w, "shape", ())) == 4), None)
    if kernel is None or kernel.shape[2] != 3:
        return {}
    return {"dim": int(kernel.shape[3]), "patch_size": int(kernel.shape[0])}


def _ends_in_softmax(fn) -> bool:
    """Whether the op that makes the signature's `logits`, inside the function it calls and
    past identities, is a Softmax."""
    graph = fn.graph.as_graph_def()
    called = {f.signature.name: f for f in graph.library.function}
    node = _past_identities({n.name: n for n in graph.node}, fn.outputs[0].op.name)
    if node is None or node.attr["f"].func.name not in called:
        return False
    function = called[node.attr["f"].func.name]
    inner = {n.name: n for n in function.node_def}
    found = _past_identities(inner, next(iter(function.ret.values()), ""))
    return found is not None and found.op == "Softmax"


def _past_identities(nodes: dict, name: str):
    """The node that makes tensor `name` ("node:output:0"), past Identity nodes."""
    node = nodes.get(name.split(":")[0])
    for _ in nodes:  # as long as the graph at most
        if node is None or node.op != "Identity" or not node.input:
            break
        node = nodes.get(node.input[0].split(":")[0])
    return node


def _write(job, path):
    return export_saved_model(job.model, path)


FORMAT = ExportFormat(
    name="saved_model",
    filename="saved_model",
    aliases=("savedmodel",),
    summary="TensorFlow SavedModel, signature serving_default: images -> logits, dynamic batch",
    write=_write,
    load=SavedModelRunner,
    tolerance=1e-4,
    facts=read_facts,
)
