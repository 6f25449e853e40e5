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


STRIPE_SIZE = 32


def stripe_images(count, seed, classes=4, size=STRIPE_SIZE):
    """Noisy images whose class is the orientation of their stripes (uint8 values, float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    labels = rng.integers(0, classes, count)
    images = np.empty((count, size, size, 3), np.float32)
    for i, c in enumerate(labels):
        angle = np.pi * (c + rng.uniform(-0.15, 0.15)) / classes
        wave = 60 * np.sin((xx * np.sin(angle) + yy * np.cos(angle)) / 1.5 + rng.uniform(0, 2 * np.pi))
        images[i] = np.clip(rng.uniform(60, 190, 3) + wave[..., None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    return np.round(images), labels


def train_on_stripes(dim, depth, count, epochs, classes=4, activation="gelu"):
    """A small ConvMixer (raw RGB in) trained on stripe images until it tells them apart:
    real margins between classes, unlike random weights, for checks of quantised files."""
    import keras

    import convmixer_tf

    keras.utils.set_random_seed(0)
    model = convmixer_tf.ConvMixer(dim=dim, depth=depth, kernel_size=7, patch_size=2, num_classes=classes,
                                   activation=activation, input_shape=(STRIPE_SIZE, STRIPE_SIZE, 3),
                                   include_preprocessing=True)
    x, y = stripe_images(count, seed=0, classes=classes)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    test_x, test_y = stripe_images(64, seed=1, classes=classes)
    assert np.mean(model.predict(test_x, verbose=0).argmax(1) == test_y) >= 0.9  # it learned the task
    return model
