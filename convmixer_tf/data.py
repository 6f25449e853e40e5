"""Where images come from (image folders, tfds sets) and the pipelines that turn them into
training and evaluation batches (TensorFlow ops; no torch). Several processes' shares of
the data are `convmixer_tf.processes`'.

Every source yields unbatched (uint8 HxWx3 image, int32 label) pairs; the pipelines turn
them into batches of raw float32 pixels, because every model trained here normalises
inside its graph (the `preprocessing` layer).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np

from convmixer_tf.config import PIXEL_MAX, Preprocessing
from convmixer_tf.errors import one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFDS_PREFIX = "tfds:"
VAL_SPLIT_NAMES = ("validation", "val", "test")
CACHE_LIMIT_BYTES = 2 << 30  # decoded sets this small stay in memory (CIFAR-10's training set: 150 MB)


def list_images(directory) -> List[str]:
    """Image files under `directory` (recursively), sorted for reproducibility."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"image directory not found: {directory}")
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}")
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
    new_h = tf.maximum(tf.cast(tf.math.round(tf.cast(h * scale_size, tf.float32) / short), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.math.round(tf.cast(w * scale_size, tf.float32) / short), tf.int32), size)
    image = tf.image.resize(image, (new_h, new_w), method=preprocessing.interpolation, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = tf.clip_by_value(image[top:top + size, left:left + size, :], 0.0, PIXEL_MAX)
    return preprocessing.normalize(image) if normalize else image


# --------------------------------------------------------------------------------------
# One parser for every option that names images: DIR or tfds:NAME[:SPLIT]

@dataclasses.dataclass(frozen=True)
class ImageSource:
    folder: Optional[str] = None
    tfds_name: Optional[str] = None
    split: Optional[str] = None

    def __str__(self):
        return self.folder or f"{TFDS_PREFIX}{self.tfds_name}" + (f":{self.split}" if self.split else "")


def parse_source(text) -> ImageSource:
    """`DIR` or `tfds:NAME[:SPLIT]` -> ImageSource; ValueError naming the syntax otherwise."""
    text = os.fspath(text)
    if not text.startswith(TFDS_PREFIX):
        return ImageSource(folder=text)
    name, _, split = text[len(TFDS_PREFIX):].partition(":")  # a split may hold ':' (train[:10%])
    if not name:
        raise ValueError(f"cannot read image source {text!r}: expected DIR|tfds:NAME[:SPLIT]")
    return ImageSource(tfds_name=name, split=split or None)


def read_images(source: ImageSource, preprocessing: Preprocessing, count: Optional[int] = None,
                normalize: bool = True) -> Tuple[np.ndarray, List[str], str]:
    """The first `count` images of `source` (a folder's in sorted order, recursively; a
    tfds split, default validation, in its own) with timm's eval transform, as one NHWC
    float32 array: (images, their names, where they came from). Nothing is downloaded."""
    if source.folder is not None:
        names = list_images(source.folder)[:count]
        raws = [_decoded(path, strict=True) for path in names]
        description = f"{source.folder} ({len(names)} images)"
    else:
        import tensorflow_datasets as tfds

        split = source.split or "validation"
        try:
            split_ds = tfds.load(source.tfds_name, split=split, shuffle_files=False, download=False)
        except Exception as err:  # noqa: BLE001 - tfds raises many kinds for an unprepared set
            raise ValueError(f"cannot load {TFDS_PREFIX}{source.tfds_name}:{split}: {one_line(err)[:200]}"
                             " (prepare it with tfds first; nothing is downloaded here)") from None
        raws = [example["image"] for example in split_ds.take(count or -1)]
        names = [f"{source.tfds_name}:{split}[{i}]" for i in range(len(raws))]
        description = f"{TFDS_PREFIX}{source.tfds_name}:{split} (first {len(raws)})"
    if not raws:
        raise ValueError(f"no images in {source}")
    images = np.stack([eval_transform(raw, preprocessing, normalize).numpy() for raw in raws])
    return images.astype(np.float32), names, description


def load_eval_images(directory, preprocessing: Preprocessing, limit: Optional[int] = None, normalize: bool = True):
    """(NHWC float32 images, their paths) of a folder, with timm's eval transform."""
    return read_images(ImageSource(folder=os.fspath(directory)), preprocessing, limit, normalize)[:2]


# --------------------------------------------------------------------------------------
# Training and evaluation datasets

@dataclasses.dataclass
class DataSource:
    """One dataset, opened.

    Attributes:
        name: the tfds name, or the image folder.
        train, val: unbatched tf.data datasets of (uint8 (H, W, 3), int32) pairs; val may be None.
        train_size, val_size: number of examples.
        class_names: label names in label order.
        image_shape: (H, W) when every image has that size (such sets are cached), else None.
        skipped: (file, reason) of the images that could not be decoded and were left out.
        train_files: (paths, labels) of an image folder's training images, which
            `train_pipeline` shuffles and shards by index.
    """

    name: str
    train: object
    val: Optional[object]
    train_size: int
    val_size: int
    class_names: List[str]
    image_shape: Optional[Tuple[int, int]] = None
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    train_files: Optional[Tuple[List[str], List[int]]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_dataset(dataset: Optional[str] = None, data_dir=None, *, tfds_data_dir=None, manual_dir=None,
                 offline: bool = False, train_split: Optional[str] = None, val_split: Optional[str] = None,
                 val_fraction: float = 0.1, seed: int = 0, strict_images: bool = False, shard=None) -> DataSource:
    """Opens a tensorflow-datasets set by name, or an image folder (one folder per class).

    Args:
        dataset: a tfds name ("cifar10", "imagenette", "imagenet2012", ...).
        data_dir: an image folder instead: DIR/train/<class>/* and DIR/val/<class>/*
            (or "validation"), or DIR/<class>/* split by `val_fraction`.
        tfds_data_dir, manual_dir: where tfds keeps its prepared copies; its manual_dir.
        offline: never download; a set that is not prepared yet is an error.
        train_split, val_split: tfds split names; default "train" and the first of
            validation / val / test that the set has. A val_split of "none" skips it.
        val_fraction: held-out share of a folder without a val/ subfolder.
        strict_images: an image folder's files are all decoded once before use; one
            that cannot be is left out (`DataSource.skipped`), or, with strict_images,
            a ValueError naming it. tfds sets were decoded when tfds prepared them.
        shard: this process's place (`processes.Shard`) when several train together: a
            tfds training split is opened as its even share.

    Example:
        >>> source = open_dataset(data_dir="flowers/")           # doctest: +SKIP
        >>> source.num_classes, source.train_size                # doctest: +SKIP
    """
    if (dataset is None) == (data_dir is None):
        raise ValueError("give exactly one of --dataset (a tfds name) and --data-dir (an image folder)")
    source = parse_source(data_dir if data_dir is not None else TFDS_PREFIX + str(dataset).removeprefix(TFDS_PREFIX))
    if source.folder is not None:
        return _open_folder(source.folder, val_fraction, seed, strict_images)
    splits = (train_split or source.split or "train", val_split)
    return _open_tfds(source.tfds_name, splits, data_dir=tfds_data_dir, manual_dir=manual_dir, offline=offline,
                      shard=shard)


def _open_folder(directory, val_fraction, seed, strict_images):
    if not os.path.isdir(directory):
        raise ValueError(f"--data-dir not found: {directory}")
    val_dir = next((os.path.join(directory, d) for d in ("val", "validation")
                    if os.path.isdir(os.path.join(directory, d))), None)
    train_dir = os.path.join(directory, "train") if val_dir and os.path.isdir(os.path.join(directory, "train")) \
        else directory
    classes = sorted(c for c in os.listdir(train_dir) if not c.startswith(".") and _has_images(train_dir, c))
    if len(classes) < 2:
        raise ValueError(f"--data-dir {directory} needs one sub-folder of images per class (at least 2), "
                         f"found {len(classes)}")
    train = _labelled_files(train_dir, classes)
    val = _labelled_files(val_dir, classes) if train_dir != directory else []
    skipped = _unreadable(train + val, strict_images)
    bad = dict(skipped)
    train, val = [f for f in train if f[0] not in bad], [f for f in val if f[0] not in bad]
    if train_dir == directory:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        held = set(np.random.default_rng(seed).permutation(len(train))[:int(round(len(train) * val_fraction))])
        train, val = [f for i, f in enumerate(train) if i not in held], [f for i, f in enumerate(train) if i in held]
    paths, labels = [p for p, _ in train], [y for _, y in train]
    return DataSource(name=directory, train=_files_dataset(train), val=_files_dataset(val) if val else None,
                      train_size=len(train), val_size=len(val), class_names=classes, skipped=skipped,
                      train_files=(paths, labels))


def _has_images(folder, name) -> bool:
    path = os.path.join(folder, name)
    return os.path.isdir(path) and any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, fs in os.walk(path) for f in fs)


def _labelled_files(folder, classes) -> list:
    return [(path, label) for label, name in enumerate(classes) if _has_images(folder, name)
            for path in list_images(os.path.join(folder, name))]


def _files_dataset(files):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(([p for p, _ in files], np.asarray([y for _, y in files], np.int32)))
    return ds.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)


def warn_skipped(source: DataSource, log, shown: int = 5) -> None:
    """One warning line per image left out of `source` (the first `shown`), then a count."""
    for path, reason in source.skipped[:shown]:
        log(f"warning: left out unreadable image {path}: {reason}")
    if len(source.skipped) > shown:
        log(f"warning: left out {len(source.skipped) - shown} more unreadable images")


def _unreadable(files, strict: bool) -> List[Tuple[str, str]]:
    """(path, reason) of each file that does not decode; ValueError on the first with `strict`.

    Every file is decoded once, in parallel threads (TensorFlow's decoders release the
    GIL): an epoch must not die on a truncated file halfway through, and a file that
    does not decode must be named, which a decode inside tf.data cannot do.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 2)) as pool:
        bad = [(path, reason) for (path, _), reason in zip(files, pool.map(_decode_problem, files)) if reason]
    if bad and strict:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"unreadable image {bad[0][0]}: {bad[0][1]}{more}; without --strict-images such files are "
                         "skipped with a warning")
    return bad


def _decoded(path, strict: bool = False):
    """The image in file `path` (uint8, H x W x 3); what is wrong with it as a string when it
    does not decode, or, with `strict`, a ValueError naming it."""
    import tensorflow as tf

    try:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as err:
        # "{{function_node ...}} Invalid PNG data, size 1234 [Op:DecodeImage]" -> the middle
        reason = err.message.splitlines()[0].split("}} ")[-1].split(" [Op:")[0] or type(err).__name__
        if strict:
            raise ValueError(f"cannot decode image {path}: {reason}") from None
        return reason


def _decode_problem(file) -> Optional[str]:
    decoded = _decoded(file[0])
    return decoded if isinstance(decoded, str) else None


def _decode_file(path, label):
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def _open_tfds(name, splits, *, data_dir, manual_dir, offline, shard):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} (see tfds.list_builders(), or use --data-dir)") from None
    if not builder.is_prepared():
        if offline and manual_dir is None:
            raise ValueError(f"dataset {name!r} is not prepared under {builder.data_dir} and --offline forbids "
                             "downloading: prepare it there, or pass --manual-dir with its archive")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir) if manual_dir else None))
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(f"tfds dataset {name!r} is not an image classification set (needs 'image' and 'label')")
    names = list(info.splits.keys())  # empty under tfds.testing.mock_data
    train_split, val_split = splits
    if val_split is None:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in names), None if names else "test")
    val_split = None if val_split == "none" else val_split
    for split in (train_split, val_split):
        if names and split is not None and split.split("[")[0] not in names:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {', '.join(names)}")

    def load(split):
        train = split == train_split
        if train and shard is not None and shard.count > 1:  # its even share, as tfds.split_for_jax_process
            split = tfds.even_splits(split, n=shard.count, drop_remainder=True)[shard.index]
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=train)
        ds = ds.map(lambda image, label: (image, tf.cast(label, tf.int32)))
        # num_examples also counts slices such as "train[:10%]"
        return ds, int(info.splits[split].num_examples) if names else int(ds.reduce(0, lambda n, _: n + 1))

    (train, train_size), (val, val_size) = load(train_split), load(val_split) if val_split else (None, 0)
    shape = info.features["image"].shape
    return DataSource(name=name, train=train, val=val, train_size=train_size, val_size=val_size,
                      class_names=list(info.features["label"].names),
                      image_shape=tuple(shape[:2]) if None not in shape[:2] else None)


def train_pipeline(source: DataSource, augmenter, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 10_000,
                   shard=None):
    """Shuffled, augmented, batched training data: (float32 raw pixels, one-hot labels),
    in batches of batch_size / shard.count (this process's share of the global batch).

    An image folder is reshuffled every epoch by index and only this process's (`shard`,
    a `processes.Shard`) examples are decoded (`processes.folder_epochs`); a tfds set
    (opened with the same shard: its own even split) is shuffled through a buffer.
    Decoding and augmentation run in parallel, batches are prefetched, small fixed-size
    sets are cached decoded. The last partial batch is dropped: every step has one shape.
    """
    import tensorflow as tf

    from convmixer_tf.processes import Shard, folder_epochs

    shard = shard or Shard()
    if batch_size % shard.count:
        raise ValueError(f"batch_size {batch_size} does not split over {shard.count} processes")
    ordered = source.train_files is not None  # keeps each epoch's examples in their epoch
    if ordered:
        ds = folder_epochs(source.train_files, batch_size, shard, seed, _decode_file)
    else:
        ds = source.train
        if source.image_shape is not None and source.train_size * np.prod(source.image_shape) * 3 <= CACHE_LIMIT_BYTES:
            ds = ds.cache()
        ds = ds.shuffle(min(shuffle_buffer, max(source.train_size, 1)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(augmenter.image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    ds = ds.batch(batch_size // shard.count, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter.config.mixes:
        ds = ds.map(augmenter.batch, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_pipeline(dataset, preprocessing: Preprocessing, batch_size: int, *, num_classes: Optional[int] = None,
                  normalize: bool = False, cache: bool = False, shard=None, size: Optional[int] = None):
    """Batched evaluation data with timm's transform (resize by crop_pct, centre crop).

    Yields (float32 images, labels): raw pixels unless normalize=True (for a model
    without its own preprocessing layer); labels one-hot when num_classes is given,
    else int32. With `shard` (several processes, `size` examples), this process's
    share, evened out with examples of weight 0 (`processes.sharded_eval_pipeline`).
    """
    import tensorflow as tf

    side = preprocessing.input_size

    def transform(image, label):
        x = eval_transform(image, preprocessing, normalize)
        x.set_shape([side, side, 3])
        return x, (tf.one_hot(label, num_classes) if num_classes else label)

    if shard is not None:
        from convmixer_tf.processes import sharded_eval_pipeline

        blank = (tf.zeros([side, side, 3]), tf.zeros([num_classes]))
        return sharded_eval_pipeline(dataset, size, transform, batch_size, blank=blank, shard=shard, cache=cache)
    ds = dataset.cache() if cache else dataset
    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def write_image_folder(root, num_classes: int = 4, per_class: int = 32, size=(48, 48), seed: int = 0) -> str:
    """A small generated image folder, root/class{c}/{i}.png: a stand-in for a real dataset
    where none can be downloaded. Each class is a noisy colour with stripes of its own
    orientation, learnable whatever the crop or flip.

    Example:
        >>> write_image_folder("toy_images", num_classes=3, per_class=8)   # doctest: +SKIP
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (num_classes, 3))
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for c in range(num_classes):
        os.makedirs(os.path.join(os.fspath(root), f"class{c}"), exist_ok=True)
        stripes = 30 * np.sin((xx * np.cos(np.pi * c / num_classes) + yy * np.sin(np.pi * c / num_classes)) / 3.0)
        for i in range(per_class):
            image = np.clip(colours[c] + stripes[..., None] + rng.normal(0, 25, (*size, 3)), 0, PIXEL_MAX)
            tf.io.write_file(os.path.join(os.fspath(root), f"class{c}", f"{i}.png"),
                             tf.io.encode_png(image.astype(np.uint8)))
    return os.fspath(root)
