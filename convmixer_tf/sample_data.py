"""A small generated image folder: a stand-in for a real dataset where none can be
downloaded (the notebooks' offline runs). Each class is a noisy colour with a stripe
orientation of its own, so a model can learn it whatever the crop or flip."""

from __future__ import annotations

import os

import numpy as np


def write_image_folder(root, num_classes: int = 4, per_class: int = 32, size=(48, 48), seed: int = 0) -> str:
    """Writes root/class{c}/{i}.png for c < num_classes; returns root.

    Example:
        >>> write_image_folder("toy_images", num_classes=3, per_class=8)   # doctest: +SKIP
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (num_classes, 3))
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for c in range(num_classes):
        folder = os.path.join(os.fspath(root), f"class{c}")
        os.makedirs(folder, exist_ok=True)
        angle = np.pi * c / num_classes
        stripes = 30 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0)
        for i in range(per_class):
            image = colours[c] + stripes[..., None] + rng.normal(0, 25, (h, w, 3))
            png = tf.io.encode_png(np.clip(image, 0, 255).astype(np.uint8))
            tf.io.write_file(os.path.join(folder, f"{i}.png"), png)
    return os.fspath(root)
