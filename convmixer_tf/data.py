"""Input pipelines and preprocessing (TensorFlow ops; no torch)."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from convmixer_tf.config import Preprocessing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_images(directory) -> List[str]:
    """Image files under `directory` (recursively), sorted for reproducibility."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"image directory not found: {directory}")
    found = []
    for root, _, files in os.walk(directory):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}")
    return sorted(found)


def eval_transform(image, preprocessing: Preprocessing, normalize: bool = True):
    """timm's evaluation transform: resize the shorter side to size/crop_pct, centre crop.

    `image` is an (H, W, 3) uint8 or 0-255 float tensor; returns float32 (size, size, 3),
    normalised with the preprocessing mean/std unless normalize=False (raw 0-255).
    """
    import tensorflow as tf

    size = preprocessing.input_size
    scale_size = int(np.floor(size / preprocessing.crop_pct))
    image = tf.cast(image, tf.float32)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.minimum(h, w)
    new_h = tf.cast(tf.math.round(tf.cast(h * scale_size, tf.float32) / tf.cast(short, tf.float32)), tf.int32)
    new_w = tf.cast(tf.math.round(tf.cast(w * scale_size, tf.float32) / tf.cast(short, tf.float32)), tf.int32)
    new_h, new_w = tf.maximum(new_h, size), tf.maximum(new_w, size)
    image = tf.image.resize(image, (new_h, new_w), method=preprocessing.interpolation, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = tf.clip_by_value(image[top:top + size, left:left + size, :], 0.0, 255.0)
    if normalize:
        image = (image / 255.0 - tf.constant(preprocessing.mean)) / tf.constant(preprocessing.std)
    return image


def load_eval_images(directory, preprocessing: Preprocessing, limit: Optional[int] = None,
                     normalize: bool = True) -> Tuple[np.ndarray, List[str]]:
    """Reads and preprocesses the images of a folder into one NHWC float32 array."""
    import tensorflow as tf

    paths = list_images(directory)[:limit]
    images = []
    for path in paths:
        try:
            raw = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except tf.errors.OpError as err:
            raise ValueError(f"cannot decode image {path}: {err.message.splitlines()[0]}") from None
        images.append(eval_transform(raw, preprocessing, normalize).numpy())
    return np.stack(images).astype(np.float32), paths
