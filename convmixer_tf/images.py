"""Image files and what the network sees of them: listing a folder, reading a file, and
timm's evaluation transform (resize by crop_pct, centre crop, the normalisation), whose
geometry `Preprocessing.eval_crop` computes for two executors:
- `load_image`: PIL and numpy, no TensorFlow: timm's transform itself (timm's is PIL's),
  for `predict` and the tools that read a folder of images (calibration, parity). It reads
  through Python within bounds (`decoding`) and turns any failure into `BadInput`.
- `eval_transform`: TensorFlow ops, for tf.data pipelines, on an image TensorFlow decoded
  (`decode_file`, checked first by `decoded`).
TensorFlow's resizes the crop alone; PIL's too where timm's whole resize would pass
`decoding` allows (a long thin image, a tiny crop_pct)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import stat
from typing import Iterator, List, Optional, Tuple

import numpy as np

from convmixer_tf import decoding
from convmixer_tf.config import PIXEL_MAX, Preprocessing
from convmixer_tf.errors import BadInput, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFDS_PREFIX = "tfds:"
# Preprocessing.interpolation -> PIL's filter, and TensorFlow's ScaleAndTranslate kernel
# (antialiased, it is PIL's filter; nearest is the box of one source pixel, not widened)
PIL_FILTERS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "area": "BOX"}
TF_KERNELS = {"bicubic": "keyscubic", "bilinear": "triangle", "nearest": "box", "area": "box"}


def list_images(directory) -> List[str]:
    """Image files (regular files named *.jpg, *.png, ...) under `directory`, recursively,
    sorted; BadInput naming a folder that cannot be listed."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise BadInput(f"image directory not found: {directory}")
    found = sorted(
        path
        for path in files_under(directory)
        if path.lower().endswith(IMAGE_EXTENSIONS) and _is_regular(path)
    )
    if not found:
        raise BadInput(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}")
    return found


def files_under(directory: str) -> Iterator[str]:
    """The path of everything but a folder under `directory` (links to folders included,
    not followed), folder by folder; BadInput naming a folder that cannot be listed. A
    loop, not os.walk, which recurses once a level: a folder nested past Python's
    recursion limit raised RecursionError."""
    pending = [directory]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        yield entry.path
        except OSError as err:
            raise BadInput(f"cannot list {folder}: {err.strerror}") from None


def _is_regular(path) -> bool:
    """A regular file (through a symbolic link): never a FIFO, which would block on open."""
    try:
        return stat.S_ISREG(os.stat(os.fsencode(path)).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# PIL: a file read within bounds (`decoding`), then timm's transform


def _transformed(image, preprocessing: Preprocessing) -> np.ndarray:
    """timm's evaluation transform of an RGB PIL image: uint8 (size, size, 3) raw pixels."""
    from PIL import Image

    crop = preprocessing.eval_crop(*image.size)
    resample = Image.Resampling[PIL_FILTERS[preprocessing.interpolation]]
    size = crop.size
    if decoding.fits(*crop.resized):
        # timm's own steps, so its own pixels
        left, top = crop.corner
        resized = image.resize(crop.resized, resample)
        return np.asarray(resized.crop((left, top, left + size, top + size)))
    # Larger than any image decoded here: resize the crop alone, from its box in the source.
    # PIL takes the box in float32 (and may pass in the other order), so a pixel may differ
    # from timm's by a few levels; timm's own would not fit.
    window = crop.window()
    part = image.crop(window)
    left, top, right, bottom = crop.box()
    box = (left - window[0], top - window[1], right - window[0], bottom - window[1])
    return np.asarray(part.resize((size, size), resample, box=box))


def _finished(pixels: np.ndarray, preprocessing: Preprocessing, normalize: bool) -> np.ndarray:
    pixels = pixels.astype(np.float32)
    return preprocessing.normalize(pixels).astype(np.float32) if normalize else pixels


def load_image(source, preprocessing: Preprocessing, *, normalize: bool = True) -> np.ndarray:
    """What the network sees of an image file: timm's evaluation transform of its first
    frame, computed with PIL and numpy (no TensorFlow).

    Args:
        source: a path (str, bytes, os.PathLike; read through its bytes, so any name the
            file system gives opens), or a binary file object.
        preprocessing: the transform: size, crop_pct, interpolation, mean and std.
        normalize: `preprocessing.normalize` the pixels; else raw RGB from 0 to PIXEL_MAX.

    Returns float32 (size, size, 3). Raises BadInput, with a one-line reason that does not
    name the file (the caller does), for anything that does not give an image: not a
    regular file, another format, damaged bytes, larger than `decoding` allows.

    Example:
        >>> load_image("cat.jpg", Preprocessing()).shape      # doctest: +SKIP
        (224, 224, 3)
    """
    opened = (
        contextlib.nullcontext(source) if hasattr(source, "read") else decoding.open_file(source)
    )
    with opened as file:
        image = decoding.header(file, reduce=True)
        with decoding.holding(image):
            pixels = _transformed(decoding.rgb(image), preprocessing)
    return _finished(pixels, preprocessing, normalize)


# --------------------------------------------------------------------------------------
# TensorFlow: decoding for tf.data, and the same transform in its ops


def decoded(path):
    """The image in file `path` as TensorFlow's decoders give it to a tf.data pipeline
    (uint8 H x W x 3, an animation's first frame); BadInput with the reason when it does
    not decode, or is larger than `decoding` allows (read from its header first)."""
    import tensorflow as tf

    with decoding.open_file(path) as file:
        decoding.header(file, reduce=False)
        file.seek(0)
        data = file.read()
    try:
        return tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError as err:
        # "{{function_node ...}} Invalid PNG data, size 1234 [Op:DecodeImage]" -> the middle
        reason = err.message.splitlines()[0].split("}} ")[-1].split(" [Op:")[0]
        raise BadInput(reason or type(err).__name__) from None


def decode_file(path, label):
    """The image of file `path` (uint8, H x W x 3, in a tf.data map), with its label. Give
    paths as bytes (`os.fsencode`): TensorFlow would encode a str as UTF-8."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def _scale_and_translate(preprocessing: Preprocessing, height, width):
    """The crop's source window (left, top, right, bottom) and ScaleAndTranslate's scale and
    translation (y, x) for that window: Python numbers, so that the geometry is the one
    `Preprocessing.eval_crop` computes."""
    crop = preprocessing.eval_crop(int(width), int(height))
    window = crop.window()
    (sx, sy), (left, top) = crop.scale(), crop.corner
    shift = (window[1] * sy - top, window[0] * sx - left)
    return np.array(window, np.int64), np.float32((sy, sx)), np.float32(shift)


def eval_transform(image, preprocessing: Preprocessing, normalize: bool = True):
    """timm's evaluation transform in TensorFlow ops (eager or in a tf.data map): an
    (H, W, C) tensor of raw pixels -> float32 (size, size, C), normalised
    (`Preprocessing.normalize`) unless normalize=False. Only the crop's window of the
    source is cast and resampled. TensorFlow resamples in float32 where PIL uses 8-bit
    fixed point: the pixels are rounded to whole levels, and may differ from timm's by one."""
    import tensorflow as tf

    size = preprocessing.input_size
    shape = tf.shape(image)
    window, scale, shift = tf.numpy_function(
        functools.partial(_scale_and_translate, preprocessing),
        [shape[0], shape[1]],
        [tf.int64, tf.float32, tf.float32],
        stateful=False,
    )
    part = tf.cast(image[window[1] : window[3], window[0] : window[2]], tf.float32)
    pixels = tf.raw_ops.ScaleAndTranslate(
        images=part[None],
        size=[size, size],
        scale=scale,
        translation=shift,
        kernel_type=TF_KERNELS[preprocessing.interpolation],
        antialias=preprocessing.interpolation != "nearest",
    )[0]
    pixels = tf.round(tf.clip_by_value(pixels, 0.0, PIXEL_MAX))
    pixels = tf.ensure_shape(pixels, [size, size, image.shape[-1]])
    return preprocessing.normalize(pixels) if normalize else pixels


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


def _folder_image(path, preprocessing: Preprocessing, normalize: bool) -> np.ndarray:
    try:
        return load_image(path, preprocessing, normalize=normalize)
    except BadInput as err:
        raise BadInput(f"cannot read image {path}: {err}") from None


def _array_image(array, preprocessing: Preprocessing, normalize: bool) -> np.ndarray:
    """The transform of a decoded uint8 (H, W, 3) or (H, W, 1) array (a tfds example's)."""
    from PIL import Image

    array = np.asarray(array)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
    return _finished(_transformed(image, preprocessing), preprocessing, normalize)


def read_images(
    source: ImageSource,
    preprocessing: Preprocessing,
    count: Optional[int] = None,
    normalize: bool = True,
) -> Tuple[np.ndarray, List[str], str]:
    """The first `count` images of `source` (a folder's in sorted order, recursively; a
    tfds split, default validation, in its own) with timm's eval transform (`load_image`'s
    PIL, what `predict` sees), as one NHWC float32 array: (images, their names, where they
    came from). Nothing is downloaded."""
    if source.folder is not None:
        names = list_images(source.folder)[:count]
        images = [_folder_image(path, preprocessing, normalize) for path in names]
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
        raws = [example["image"] for example in tfds.as_numpy(split_ds.take(count or -1))]
        images = [_array_image(raw, preprocessing, normalize) for raw in raws]
        names = [f"{source.tfds_name}:{split}[{i}]" for i in range(len(raws))]
        description = f"{TFDS_PREFIX}{source.tfds_name}:{split} (first {len(raws)})"
    if not images:
        raise BadInput(f"no images in {source}")
    return np.stack(images).astype(np.float32), names, description


def write_image_folder(
    root, num_classes: int = 4, per_class: int = 32, size=(48, 48), seed: int = 0
) -> str:
    """A small generated image folder, root/class{c}/{i}.png: a stand-in for a real dataset
    where none can be downloaded. Each class is a noisy colour with stripes of its own
    orientation, learnable whatever the crop or flip.

    Example:
        >>> write_image_folder("toy_images", num_classes=3, per_class=8)   # doctest: +SKIP
    """
    from PIL import Image

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
            path = os.path.join(os.fspath(root), f"class{c}", f"{i}.png")
            Image.fromarray(image.astype(np.uint8)).save(path)
    return os.fspath(root)
