import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

TINY = dict(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=10)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def randomize_batchnorm(model, seed=0):
    """Gives every Keras BatchNormalization non-trivial statistics and affine terms.

    Fresh BN (mean 0, var 1, gamma 1, beta 0) is nearly the identity and hides a
    swapped mean/variance; every parity check runs on randomised statistics.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, n).astype("float32"),
                rng.normal(0, 0.2, n).astype("float32"),
                rng.normal(0, 0.3, n).astype("float32"),
                rng.uniform(0.5, 2.0, n).astype("float32"),
            ])
    return model


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_folder(root, per_class=24, size=(40, 48), seed=0, classes=COLOURS, names=None):
    """One sub-folder per class; each class a noisy colour (learnable whatever the crop)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, colour in enumerate(classes):
        folder = os.path.join(root, names[c] if names else f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 45, size + (3,)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return str(root)
