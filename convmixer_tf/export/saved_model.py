"""SavedModel with a serving signature: input `images`, output `logits`, dynamic batch."""

from __future__ import annotations

import os


def export_saved_model(model, path, preprocessing=None) -> str:
    """Writes `model` as a TensorFlow SavedModel directory.

    The `serving_default` signature takes `images` (float32, [batch, H, W, 3], batch
    dynamic) and returns {"logits": ...}. With `preprocessing=(mean, std)` the
    signature takes raw 0-255 RGB.

    Example:
        >>> export_saved_model(model, "out/saved_model")  # doctest: +SKIP
        >>> tf.saved_model.load("out/saved_model").signatures["serving_default"](images=x)["logits"]  # doctest: +SKIP
    """
    import keras
    import tensorflow as tf

    from convmixer_tf.model import with_preprocessing

    if preprocessing is not None:
        model = with_preprocessing(model, *preprocessing)
    shape = [None] + list(model.input_shape[1:])
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda images: {"logits": model(images, training=False)},
        input_signature=[tf.TensorSpec(shape, tf.float32, name="images")],
    )
    archive.write_out(os.fspath(path), verbose=False)
    return os.fspath(path)
