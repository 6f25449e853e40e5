"""Image files and what the network sees of them: listing a folder, decoding a file, timm's
evaluation transform (resize by crop_pct, centre crop, the normalisation), and the first
images of a folder or a tfds split as one array. TensorFlow ops; no torch."""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np

from convmixer_tf.config import PIXEL_MAX, Preprocessing
from convmixer_tf.errors import BadInput, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFDS_PREFIX = "tfds:"


def list_images(directory) -> List[str]:
    """Image files under `directory` (recursively), sorted for reproducibility."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise BadInput(f"image directory not found: {directory}")
    found = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(directory)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
        raise BadInput(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}")
    return found


def eval_transform(image, preprocessing: Preprocessing, normalize: bool = True):
    """timm's evaluation transform of an (H, W, 3) tensor of raw pixels: resize the shorter
    side to size / crop_pct, centre crop; float32 (size, size, 3), normalised
    (`Preprocessing.normalize`) unless normalize=False."""
    import tensorflow as tf

    size = preprocessing.input_size
    scale_size = int(np.floor(size / preprocessing.crop_pct))
    image = tf.cast(image, tf.float32)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(
        tf.cast(tf.math.round(tf.cast(h * scale_size, tf.float32) / short), tf.int32), size
    )
    new_w = tf.maximum(
        tf.cast(tf.math.round(tf.cast(w * scale_size, tf.float32) / short), tf.int32), size
    )
    image = tf.image.resize(
        image, (new_h, new_w), method=preprocessing.interpolation, antialias=True
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = tf.clip_by_value(image[top : top + size, left : left + size, :], 0.0, PIXEL_MAX)
    return preprocessing.normalize(image) if normalize else image


# --------------------------------------------------------------------------------------
# One parser for every option that names images: DIR or tfds:NAME[:SPLIT]


@dataclasses.dataclass(frozen=True)
class ImageSource:
    folder: Optional[str] = None
    tfds_name: Optional[str] = None
    split: Optional[str] = None

    def __str__(self):
        return self.folder or f"{TFDS_PREFIX}{self.tfds_name}" + (
            f":{self.split}" if self.split else ""
        )


def parse_source(text) -> ImageSource:
    """`DIR` or `tfds:NAME[:SPLIT]` -> ImageSource; ValueError naming the syntax otherwise."""
    text = os.fspath(text)
    if not text.startswith(TFDS_PREFIX):
        return ImageSource(folder=text)
    name, _, split = text[len(TFDS_PREFIX) :].partition(":")  # a split may hold ':' (train[:10%])
    if not name:
        raise BadInput(f"cannot read image source {text!r}: expected DIR|tfds:NAME[:SPLIT]")
    return ImageSource(tfds_name=name, split=split or None)


def read_images(
    source: ImageSource,
    preprocessing: Preprocessing,
    count: Optional[int] = None,
    normalize: bool = True,
) -> Tuple[np.ndarray, List[str], str]:
    """The first `count` images of `source` (a folder's in sorted order, recursively; a
    tfds split, default validation, in its own) with timm's eval transform, as one NHWC
    float32 array: (images, their names, where they came from). Nothing is downloaded."""
    if source.folder is not None:
        names = list_images(source.folder)[:count]
        raws = [decoded(path, strict=True) for path in names]
        description = f"{source.folder} ({len(names)} images)"
    else:
        import tensorflow_datasets as tfds

        split = source.split or "validation"
        try:
            split_ds = tfds.load(source.tfds_name, split=split, shuffle_files=False, download=False)
        except Exception as err:  # noqa: BLE001 - tfds raises many kinds for an unprepared set
            raise BadInput(
                f"cannot load {TFDS_PREFIX}{source.tfds_name}:{split}: {one_line(err)[:200]}"
                " (prepare it with tfds first; nothing is downloaded here)"
            ) from None
        raws = [example["image"] for example in split_ds.take(count or -1)]
        names = [f"{source.tfds_name}:{split}[{i}]" for i in range(len(raws))]
        description = f"{TFDS_PREFIX}{source.tfds_name}:{split} (first {len(raws)})"
    if not raws:
        raise BadInput(f"no images in {source}")
    images = np.stack([eval_transform(raw, preprocessing, normalize).numpy() for raw in raws])
    return images.astype(np.float32), names, description


def load_eval_images(
    directory, preprocessing: Preprocessing, limit: Optional[int] = None, normalize: bool = True
):
    """(NHWC float32 images, their paths) of a folder, with timm's eval transform."""
    return read_images(ImageSource(folder=os.fspath(directory)), preprocessing, limit, normalize)[
        :2
    ]


def decoded(path, strict: bool = False):
    """The image in file `path` (uint8, H x W x 3); what is wrong with it as a string when it
    does not decode, or, with `strict`, a ValueError naming it."""
    import tensorflow as tf

    try:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as err:
        # "{{function_node ...}} Invalid PNG data, size 1234 [Op:DecodeImage]" -> the middle
        reason = (
            err.message.splitlines()[0].split("}} ")[-1].split(" [Op:")[0] or type(err).__name__
        )
        if strict:
            raise BadInput(f"cannot decode image {path}: {reason}") from None
        return reason


def decode_file(path, label):
    """The image of file `path` (uint8, H x W x 3, in a tf.data map), with its label."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def write_image_folder(
    root, num_classes: int = 4, per_class: int = 32, size=(48, 48), seed: int = 0
) -> str:
    """A small generated image folder, root/class{c}/{i}.png: a stand-in for a real dataset
    where none can be downloaded. Each class is a noisy colour with stripes of its own
    orientation, learnable whatever the crop or flip.

    Example:
        >>> write_image_folder("toy_images", num_classes=3, per_class=8)   # doctest: +SKIP
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (num_classes, 3))
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    for c in range(num_classes):
        os.makedirs(os.path.join(os.fspath(root), f"class{c}"), exist_ok=True)
        stripes = 30 * np.sin(
            (xx * np.cos(np.pi * c / num_classes) + yy * np.sin(np.pi * c / num_classes)) / 3.0
        )
        for i in range(per_class):
            image = np.clip(
                colours[c] + stripes[..., None] + rng.normal(0, 25, (*size, 3)), 0, PIXEL_MAX
            )
            tf.io.write_file(
                os.path.join(os.fspath(root), f"class{c}", f"{i}.png"),
                tf.io.encode_png(image.astype(np.uint8)),
            )
    return os.fspath(root)
