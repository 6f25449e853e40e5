"""The stage outputs of the two networks parity compares, one batch at a time: after the
stem, after each block, and at the end."""

from __future__ import annotations

import numpy as np

from convmixer_tf.config import stage_layers
from weights_converter import layouts


class TorchStages:
    """The PyTorch model's (name, NHWC output) after the stem, each block, and at the end,
    for one batch at a time. Whatever the layout, each stage ends with a BatchNorm: the
    stem's, and each block's pointwise one; the layout's table says where they sit."""

    def __init__(self, torch_model):
        layout, self.depth = layouts.layout_of(torch_model.state_dict())
        table = layouts.modules(layout, self.depth)
        self.modules = [("stem", table["stem.2"])] + [
            (f"block{i}", table[f"blocks.{i}.3"]) for i in range(self.depth)
        ]
        self.model = torch_model.eval()

    def __call__(self, inputs) -> list:
        import torch

        captured = {}
        hooks = [
            self.model.get_submodule(module).register_forward_hook(
                lambda m, args, out, name=name: captured.__setitem__(
                    name, out.detach().numpy().transpose(0, 2, 3, 1).copy()
                )
            )
            for name, module in self.modules
        ]
        try:
            with torch.no_grad():
                out = self.model(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).numpy()
        finally:
            for hook in hooks:
                hook.remove()
        return [(name, captured[name]) for name, _ in self.modules] + [("output", out)]


class KerasStages:
    """The Keras model's stage outputs and its output, for one batch at a time. It runs as
    one compiled function (predict_on_batch), which frees each layer's output once the
    next has used it; called eagerly, a functional model keeps every one to the end."""

    def __init__(self, keras_model, depth):
        import keras

        layers = stage_layers(depth)
        self.probe = keras.Model(
            keras_model.input,
            [keras_model.get_layer(n).output for n in layers] + [keras_model.output],
        )
        self.probe.jit_compile = False  # XLA (on a GPU) may round differently

    def __call__(self, inputs) -> list:
        return [np.asarray(t) for t in self.probe.predict_on_batch(inputs)]
