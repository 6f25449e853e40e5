"""Images for int8 calibration and for checking files: a folder, a tfds split, or synthetic.

Each source yields raw RGB at the model's input size (timm's eval transform), or
normalised images when the exported graph has no preprocessing in it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from convmixer_tf.config import PIXEL_MAX, Preprocessing

# How many images int8 formats are calibrated on by default, and how many more are held
# out to check every file (never used for calibration).
CALIBRATION_COUNT = 64
VERIFY_COUNT = 8


def load_images(
    source: Optional[str], preprocessing: Preprocessing, count: int, *, raw_rgb: bool, seed: int = 0
) -> Tuple[np.ndarray, str]:
    """Returns (NHWC float32 images, description of where they came from).

    Args:
        source: an image folder, "tfds:NAME" or "tfds:NAME:SPLIT" (see
            `convmixer_tf.images.parse_source`), or None for synthetic images (smooth random
            colour fields; fine for checking a file, not for judging quantisation
            accuracy, and the description says so).
        preprocessing: input size, crop and mean/std of the model.
        count: how many images.
        raw_rgb: return raw pixels instead of normalised ones.
    """
    from convmixer_tf.images import parse_source, read_images

    if source is None:
        images = synthetic_images(count, preprocessing.input_size, seed)
        images = images if raw_rgb else preprocessing.normalize(images)
        return images.astype(np.float32), f"synthetic ({count} smooth random images, seed {seed})"
    images, _, description = read_images(
        parse_source(source), preprocessing, count, normalize=not raw_rgb
    )
    return images, description


def synthetic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields of raw pixels: low-frequency noise, bilinearly upsampled."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, PIXEL_MAX, size=(count, 6, 6, 3)).astype(np.float32)
    fine = rng.normal(0, 12, size=(count, size, size, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    return np.clip(smooth + fine, 0, PIXEL_MAX).astype(np.float32)
