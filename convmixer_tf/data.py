"""Where images come from (folders, tfds sets), and the pipelines that turn them into
training and evaluation batches (TensorFlow ops; no torch). Several processes' shares
of the data are `convmixer_tf.processes`'."""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np

from convmixer_tf.config import PIXEL_MAX, Preprocessing

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

    `image` is an (H, W, 3) tensor of raw pixels; returns float32 (size, size, 3),
    normalised (`Preprocessing.normalize`) unless normalize=False (raw pixels).
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
    image = tf.clip_by_value(image[top:top + size, left:left + size, :], 0.0, PIXEL_MAX)
    return preprocessing.normalize(image) if normalize else image


def load_eval_images(directory, preprocessing: Preprocessing, limit: Optional[int] = None,
                     normalize: bool = True) -> Tuple[np.ndarray, List[str]]:
    """Reads and preprocesses the images of a folder into one NHWC float32 array."""
    images, paths, _ = read_images(ImageSource(folder=os.fspath(directory)), preprocessing, limit, normalize)
    return images, paths


# --------------------------------------------------------------------------------------
# Where images come from: one parser for every option that names images

TFDS_PREFIX = "tfds:"
SOURCE_SYNTAX = "DIR|tfds:NAME[:SPLIT]"


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """An image folder (class sub-folders, DIR/train + DIR/val, or just images) or a
    tensorflow-datasets set and split."""

    folder: Optional[str] = None
    tfds_name: Optional[str] = None
    split: Optional[str] = None

    def __str__(self):
        if self.folder is not None:
            return self.folder
        return f"{TFDS_PREFIX}{self.tfds_name}" + (f":{self.split}" if self.split else "")


def parse_source(text) -> ImageSource:
    """`DIR` or `tfds:NAME[:SPLIT]` -> ImageSource; ValueError naming the syntax otherwise."""
    text = os.fspath(text)
    if not text.startswith(TFDS_PREFIX):
        return ImageSource(folder=text)
    name, _, split = text[len(TFDS_PREFIX):].partition(":")  # a split may hold ':' (train[:10%])
    if not name:
        raise ValueError(f"cannot read image source {text!r}: expected {SOURCE_SYNTAX}")
    return ImageSource(tfds_name=name, split=split or None)


def read_images(source: ImageSource, preprocessing: Preprocessing, count: Optional[int] = None,
                normalize: bool = True, default_split: str = "validation") -> Tuple[np.ndarray, List[str], str]:
    """The first `count` images of `source` with timm's eval transform, as one NHWC
    float32 array; returns (images, their names, a description of where they came from).

    A folder's images are taken recursively in sorted order; a tfds split (default
    `default_split`) in its own order. Nothing is downloaded.
    """
    if source.folder is not None:
        paths = list_images(source.folder)[:count]
        raws = [decode_image_file(path) for path in paths]
        names, description = paths, f"{source.folder} ({len(paths)} images)"
    else:
        split = source.split or default_split
        raws = [example["image"] for example in _tfds_split(source.tfds_name, split).take(count or -1)]
        names = [f"{source.tfds_name}:{split}[{i}]" for i in range(len(raws))]
        description = f"{TFDS_PREFIX}{source.tfds_name}:{split} (first {len(raws)})"
    if not raws:
        raise ValueError(f"no images in {source}")
    images = np.stack([eval_transform(raw, preprocessing, normalize).numpy() for raw in raws])
    return images.astype(np.float32), names, description


def _tfds_split(name, split):
    import tensorflow_datasets as tfds

    try:
        return tfds.load(name, split=split, shuffle_files=False, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many kinds for an unprepared set
        raise ValueError(f"cannot load {TFDS_PREFIX}{name}:{split}: {' '.join(str(err).split())[:200]} "
                         "(prepare it with tfds first; nothing is downloaded here)") from None


# --------------------------------------------------------------------------------------
# Training and evaluation datasets: tensorflow-datasets names or image folders.
# Every source yields unbatched (uint8 HxWx3 image, int32 label) pairs; the pipelines
# below turn them into batches of raw float32 pixels, because every model trained
# here normalises inside its graph (the `preprocessing` layer).

VAL_SPLIT_NAMES = ("validation", "val", "test")


@dataclasses.dataclass
class DataSource:
    """One dataset, opened: its splits as unbatched (image, label) datasets.

    Attributes:
        name: the tfds name, or the image folder.
        train, val: unbatched tf.data datasets of (uint8 (H, W, 3), int32) pairs;
            val may be None.
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


def open_dataset(dataset: Optional[str] = None, data_dir=None, *, tfds_data_dir=None,
                 manual_dir=None, offline: bool = False, train_split: Optional[str] = None,
                 val_split: Optional[str] = None, val_fraction: float = 0.1,
                 seed: int = 0, strict_images: bool = False, shard=None) -> DataSource:
    """Opens a tensorflow-datasets set by name, or an image folder (one folder per class).

    Args:
        dataset: a tfds name ("cifar10", "imagenette", "imagenet2012", ...).
        data_dir: an image folder instead: DIR/train/<class>/* and DIR/val/<class>/*
            (or "validation"), or DIR/<class>/* split by `val_fraction`.
        tfds_data_dir: where tfds keeps (or finds, offline) its prepared copies.
        manual_dir: tfds manual_dir (imagenet2012's tar files, or a downloaded archive).
        offline: never download; a set that is not prepared yet is an error.
        train_split, val_split: tfds split names; default "train" and the first of
            validation / val / test that the set has. A val_split of "none" skips it.
        val_fraction: held-out share of a folder without a val/ subfolder.
        strict_images: an image folder's files are all decoded once before use; one
            that cannot be is left out (`DataSource.skipped`), or, with strict_images,
            a ValueError naming it. tfds sets were decoded when tfds prepared them.
        shard: this process's place (`processes.Shard`) when several train together: a
            tfds training split is opened as its even share; a folder is sharded by
            `train_pipeline`.

    Example:
        >>> source = open_dataset(data_dir="flowers/")           # doctest: +SKIP
        >>> source.num_classes, source.train_size                # doctest: +SKIP
    """
    if (dataset is None) == (data_dir is None):
        raise ValueError("give exactly one of --dataset (a tfds name) and --data-dir (an image folder)")
    source = parse_source(data_dir) if data_dir is not None else parse_source(
        dataset if str(dataset).startswith(TFDS_PREFIX) else TFDS_PREFIX + dataset)
    if source.folder is not None:
        return _open_folder(source.folder, val_fraction, seed, strict_images)
    return _open_tfds(source.tfds_name, tfds_data_dir, manual_dir, offline, train_split or source.split, val_split,
                      shard)


def _class_folders(directory):
    return sorted(d for d in os.listdir(directory)
                  if os.path.isdir(os.path.join(directory, d)) and not d.startswith("."))


def _folder_files(directory, classes):
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue
        for path in list_images(class_dir) if _has_images(class_dir) else []:
            paths.append(path)
            labels.append(label)
    return paths, labels


def _has_images(directory):
    return any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(directory) for f in files)


def _open_folder(directory, val_fraction, seed, strict_images=False):
    import tensorflow as tf

    if not os.path.isdir(directory):
        raise ValueError(f"--data-dir not found: {directory}")
    val_dir = next((os.path.join(directory, d) for d in ("val", "validation")
                    if os.path.isdir(os.path.join(directory, d))), None)
    train_dir = os.path.join(directory, "train")
    train_dir = train_dir if val_dir and os.path.isdir(train_dir) else directory
    classes = [c for c in _class_folders(train_dir) if _has_images(os.path.join(train_dir, c))]
    if len(classes) < 2:
        raise ValueError(
            f"--data-dir {directory} needs one sub-folder of images per class (at least 2), "
            f"found {len(classes)}")
    train_paths, train_labels = _folder_files(train_dir, classes)
    val_paths, val_labels = _folder_files(val_dir, classes) if train_dir != directory else ([], [])
    skipped = _unreadable_images(train_paths + val_paths, strict_images)
    if skipped:
        bad = {path for path, _ in skipped}
        train_paths, train_labels = _without(bad, train_paths, train_labels)
        val_paths, val_labels = _without(bad, val_paths, val_labels)
    if train_dir == directory:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        order = np.random.default_rng(seed).permutation(len(train_paths))
        n_val = int(round(len(order) * val_fraction))
        held = set(order[:n_val].tolist())
        val_paths = [p for i, p in enumerate(train_paths) if i in held]
        val_labels = [y for i, y in enumerate(train_labels) if i in held]
        train_paths = [p for i, p in enumerate(train_paths) if i not in held]
        train_labels = [y for i, y in enumerate(train_labels) if i not in held]

    def files_dataset(paths, labels):
        ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
        return ds.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)

    return DataSource(
        name=directory,
        train=files_dataset(train_paths, train_labels),
        val=files_dataset(val_paths, val_labels) if val_paths else None,
        train_size=len(train_paths), val_size=len(val_paths), class_names=classes, skipped=skipped,
        train_files=(train_paths, train_labels),
    )


def warn_skipped(source: DataSource, log, shown: int = 5) -> None:
    """One warning line per image left out of `source` (the first `shown`), then a count."""
    for path, reason in source.skipped[:shown]:
        log(f"warning: left out unreadable image {path}: {reason}")
    if len(source.skipped) > shown:
        log(f"warning: left out {len(source.skipped) - shown} more unreadable images")


def _without(bad, paths, labels):
    kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
    return [p for p, _ in kept], [y for _, y in kept]


def _unreadable_images(paths, strict: bool) -> List[Tuple[str, str]]:
    """(path, reason) of each file that does not decode; ValueError on the first with `strict`.

    Every file is decoded once, in parallel threads (TensorFlow's decoders release the
    GIL): an epoch must not die on a truncated file halfway through, and a file that
    does not decode must be named, which a decode inside tf.data cannot do.
    """
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 2)) as pool:
        bad = [result for result in pool.map(_decode_error, paths) if result is not None]
    if bad and strict:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"unreadable image {path}: {reason}{more}; without --strict-images such files are "
                         "skipped with a warning")
    return bad


class UnreadableImage(ValueError):
    """An image file that does not decode (bad input: exit 2); `reason` is TensorFlow's."""

    def __init__(self, path, reason):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path, self.reason = path, reason


def decode_image_file(path):
    """The image in file `path` (uint8, H x W x 3); UnreadableImage when it does not decode."""
    import tensorflow as tf

    try:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as err:
        # "{{function_node ...}} Invalid PNG data, size 1234 [Op:DecodeImage]" -> the middle
        reason = err.message.splitlines()[0].split("}} ")[-1].split(" [Op:")[0]
        raise UnreadableImage(path, reason or type(err).__name__) from None


def _decode_error(path) -> Optional[Tuple[str, str]]:
    try:
        decode_image_file(path)
        return None
    except UnreadableImage as err:
        return path, err.reason


def _decode_file(path, label):
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def _open_tfds(name, data_dir, manual_dir, offline, train_split, val_split, shard=None):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} (see tfds.list_builders(), or use --data-dir)") from None
    if not builder.is_prepared():
        if offline and manual_dir is None:
            raise ValueError(
                f"dataset {name!r} is not prepared under {builder.data_dir} and --offline forbids "
                f"downloading: prepare it there, or pass --manual-dir with its archive")
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
        builder.download_and_prepare(download_config=config)
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(f"tfds dataset {name!r} is not an image classification set (needs 'image' and 'label')")
    splits = list(info.splits.keys())  # empty under tfds.testing.mock_data
    train_split = train_split or "train"
    if val_split is None:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in splits), None if splits else "test")
    elif val_split == "none":
        val_split = None
    for split in (train_split, val_split):
        if splits and split is not None and split.split("[")[0] not in splits:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {', '.join(splits)}")

    def load(split):
        train = split == train_split
        if train and shard is not None and shard.count > 1:  # its even share, as tfds.split_for_jax_process
            split = tfds.even_splits(split, n=shard.count, drop_remainder=True)[shard.index]
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=train)
        return ds.map(_int32_label)

    def size(split, ds):
        if splits:
            return int(info.splits[split].num_examples)  # also for slices such as "train[:10%]"
        return int(ds.reduce(0, lambda count, _: count + 1))

    shape = info.features["image"].shape
    train, val = load(train_split), load(val_split) if val_split else None
    return DataSource(
        name=name, train=train, val=val,
        train_size=size(train_split, train), val_size=size(val_split, val) if val is not None else 0,
        class_names=list(info.features["label"].names),
        image_shape=tuple(shape[:2]) if None not in shape[:2] else None,
    )


def _int32_label(image, label):
    import tensorflow as tf

    return image, tf.cast(label, tf.int32)


# Cache decoded images in memory when they fit in this many bytes (CIFAR-10's 50k
# training images take 150 MB).
CACHE_LIMIT_BYTES = 2 << 30


def _cacheable(source: DataSource, size: int) -> bool:
    if source.image_shape is None:
        return False
    h, w = source.image_shape
    return size * h * w * 3 <= CACHE_LIMIT_BYTES


def train_pipeline(source: DataSource, augmenter, batch_size: int, *, seed: int = 0,
                   shuffle_buffer: int = 10_000, cache: Optional[bool] = None, shard=None):
    """Shuffled, augmented, batched training data: (float32 raw pixels, one-hot labels),
    in batches of batch_size / shard.count (this process's share of the global batch).

    An image folder is reshuffled every epoch by index and only this process's (`shard`,
    a `processes.Shard`) examples are decoded (`processes.folder_epochs`); a tfds set
    (opened with the same shard: its own even split) is shuffled through a buffer. Decoding and augmentation
    run in parallel, batches are prefetched, small fixed-size sets are cached decoded.
    The last partial batch is dropped, so every step has the same shape.
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
        if cache if cache is not None else _cacheable(source, source.train_size):
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
        return sharded_eval_pipeline(dataset, size, transform, batch_size, blank, shard, cache=cache)
    ds = dataset.cache() if cache else dataset
    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
