"""SavedModel with a serving signature: input `images`, output `logits`, dynamic batch."""

from __future__ import annotations

import os

from convmixer_tf import contract
from convmixer_tf.contract import INFO_MEMBER
from convmixer_tf.export.base import ExportFormat
from convmixer_tf.outputs import follow_umask
from convmixer_tf.temporaries import temporary_folder


def export_saved_model(model, path, *, info=None) -> str:
    """Writes `model` as a TensorFlow SavedModel directory.

    The `serving_default` signature takes `images` (float32, [batch, H, W, 3], batch
    dynamic) and returns {"logits": ...}: raw RGB pixels when the model takes them (its
    preprocessing layer; `rebuild(model, preprocessing=(mean, std))` adds one). The model's
    facts (`info`, default its own) go with it as the asset `assets/convmixer.json`.

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
        facts = os.path.join(folder, INFO_MEMBER)  # the asset keeps its file's name
        with open(facts, "w") as f:
            f.write(contract.facts_json(info or contract.info_of(model)))
        module.facts = tf.saved_model.Asset(facts)
        tf.saved_model.save(module, os.fspath(path), signatures={"serving_default": signature})
    follow_umask(path)  # TensorFlow makes its folders 0755 whatever the umask
    return os.fspath(path)


def read_facts(path):
    """The facts a SavedModel carries (its asset), or None."""
    facts = os.path.join(os.fspath(path), "assets", INFO_MEMBER)
    if not os.path.isfile(facts):
        return None
    with open(facts) as f:
        return contract.facts_from_json(f.read(), path)


class SavedModelRunner:
    output = "logits"

    def __init__(self, path, threads: int = 2):
        import tensorflow as tf

        self._fn = tf.saved_model.load(os.fspath(path)).signatures["serving_default"]

    def __call__(self, images):
        return self._fn(images=images)["logits"].numpy()


FORMAT = ExportFormat(
    name="saved_model",
    filename="saved_model",
    aliases=("savedmodel",),
    summary="TensorFlow SavedModel, signature serving_default: images -> logits, dynamic batch",
    write=lambda job, path: export_saved_model(job.model, path, info=job.info),
    load=SavedModelRunner,
    tolerance=1e-4,
    recognises=lambda path: os.path.isfile(os.path.join(path, "saved_model.pb")),
    facts=read_facts,
)
