"""The `.keras` file as a model file to read (the converter and training write it, through
`saving.save_model`): its runner, which carries its facts (`model_file.open_model` reads
them there), so that `registry.find` and `open_model` treat it as they treat every
exported file."""

from __future__ import annotations

import os

import numpy as np

from convmixer_tf.export.base import ExportFormat


class KerasRunner:
    """Runs a `.keras` file in Keras on NHWC float32 batches (as the model takes them).

    Attributes:
        facts: its facts, as `saving.load_model` read them (stored in the file, or from its
            layers for a file of an earlier version).
        input_shape, output_shape: one image's, as the graph has them (None: any size).
        output: "probabilities" when its head ends in a softmax, else "logits".
    """

    def __init__(self, path, threads: int = 2):
        from convmixer_tf.facts import facts_of
        from convmixer_tf.saving import load_model

        self.model = load_model(os.fspath(path))
        self.facts = facts_of(self.model)
        self.input_shape = tuple(self.model.input_shape[1:])
        self.output_shape = tuple(self.model.output_shape[1:])
        softmax = self.facts.classifier_activation == "softmax"
        self.output = "probabilities" if softmax else "logits"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(images, verbose=0))


def _write(job, path):
    from convmixer_tf.saving import save_model

    return save_model(job.model, path)


FORMAT = ExportFormat(
    name="keras",
    filename="model.keras",
    summary="the Keras model with its facts (written by the converter and by training)",
    write=_write,
    load=KerasRunner,
    tolerance=0.0,
)
