"""Where training and evaluation images come from: a tfds set or an image folder (one
folder per class), as a `DataSource` of unbatched (uint8 HxWx3 image, int32 label) pairs,
every image of a folder decoded once before use so that an unreadable one is named.
`convmixer_tf.pipelines` makes batches of them."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np

from convmixer_tf.errors import BadInput
from convmixer_tf.images import (
    IMAGE_EXTENSIONS,
    TFDS_PREFIX,
    decode_file,
    decoded,
    files_under,
    list_images,
    parse_source,
)

VAL_SPLIT_NAMES = ("validation", "val", "test")


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


def open_dataset(
    dataset: Optional[str] = None,
    data_dir=None,
    *,
    tfds_data_dir=None,
    manual_dir=None,
    offline: bool = False,
    train_split: Optional[str] = None,
    val_split: Optional[str] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict_images: bool = False,
    shard=None,
) -> DataSource:
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
        shard: this process's place (`pipelines.Shard`) when several train together: a
            tfds training split is opened as its even share.

    Example:
        >>> source = open_dataset(data_dir="flowers/")           # doctest: +SKIP
        >>> source.num_classes, source.train_size                # doctest: +SKIP
    """
    if (dataset is None) == (data_dir is None):
        raise BadInput(
            "give exactly one of --dataset (a tfds name) and --data-dir (an image folder)"
        )
    source = parse_source(
        data_dir if data_dir is not None else TFDS_PREFIX + str(dataset).removeprefix(TFDS_PREFIX)
    )
    if source.folder is not None:
        return _open_folder(source.folder, val_fraction, seed, strict_images)
    splits = (train_split or source.split or "train", val_split)
    return _open_tfds(
        source.tfds_name,
        splits,
        data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        offline=offline,
        shard=shard,
    )


def _open_folder(directory, val_fraction, seed, strict_images):
    if not os.path.isdir(directory):
        raise BadInput(f"--data-dir not found: {directory}")
    train_dir, val_dir = _folder_splits(directory)
    classes = sorted(
        c for c in os.listdir(train_dir) if not c.startswith(".") and _has_images(train_dir, c)
    )
    if len(classes) < 2:
        raise BadInput(
            f"--data-dir {directory} needs one sub-folder of images per class (at least 2), "
            f"found {len(classes)}"
        )
    train = _labelled_files(train_dir, classes)
    val = _labelled_files(val_dir, classes) if val_dir else []
    skipped = _unreadable(train + val, strict_images)
    bad = dict(skipped)
    train = [f for f in train if f[0] not in bad]
    val = [f for f in val if f[0] not in bad]
    if val_dir is None:
        train, val = _hold_out(train, val_fraction, seed)
    return DataSource(
        name=directory,
        train=_files_dataset(train),
        val=_files_dataset(val) if val else None,
        train_size=len(train),
        val_size=len(val),
        class_names=classes,
        skipped=skipped,
        train_files=([p for p, _ in train], [y for _, y in train]),
    )


def _folder_splits(directory):
    """(training folder, validation folder or None): DIR/train with DIR/val (or validation),
    else DIR itself, split by a held-out share."""
    for name in ("val", "validation"):
        val_dir = os.path.join(directory, name)
        train_dir = os.path.join(directory, "train")
        if os.path.isdir(val_dir) and os.path.isdir(train_dir):
            return train_dir, val_dir
    return directory, None


def _hold_out(files, fraction, seed):
    """(training files, held-out files): a seeded random `fraction` of `files` held out."""
    if not 0.0 <= fraction < 1.0:
        raise BadInput(f"val_fraction must be in [0, 1), got {fraction}")
    count = int(round(len(files) * fraction))
    held = set(np.random.default_rng(seed).permutation(len(files))[:count])
    kept = [f for i, f in enumerate(files) if i not in held]
    return kept, [f for i, f in enumerate(files) if i in held]


def _has_images(folder, name) -> bool:
    path = os.path.join(folder, name)
    return os.path.isdir(path) and any(
        f.lower().endswith(IMAGE_EXTENSIONS) for f in files_under(path)
    )


def _labelled_files(folder, classes) -> list:
    return [
        (path, label)
        for label, name in enumerate(classes)
        if _has_images(folder, name)
        for path in list_images(os.path.join(folder, name))
    ]


def _files_dataset(files):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(
        ([os.fsencode(p) for p, _ in files], np.asarray([y for _, y in files], np.int32))
    )
    return ds.map(decode_file, num_parallel_calls=tf.data.AUTOTUNE)


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
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=min(32, (os.cpu_count() or 1) * 2)
    ) as pool:
        bad = [
            (path, reason)
            for (path, _), reason in zip(files, pool.map(_decode_problem, files))
            if reason
        ]
    if bad and strict:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadInput(
            f"unreadable image {bad[0][0]}: {bad[0][1]}{more}; without --strict-images such files are "
            "skipped with a warning"
        )
    return bad


def _decode_problem(file) -> Optional[str]:
    try:
        decoded(file[0])
    except BadInput as err:
        return str(err)
    return None


def _open_tfds(name, splits, *, data_dir, manual_dir, offline, shard):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir=data_dir, manual_dir=manual_dir, offline=offline)
    info = builder.info
    names = list(info.splits.keys())  # empty under tfds.testing.mock_data
    train_split, val_split = _tfds_splits(name, names, splits)

    def load(split):
        train = split == train_split
        # its even share, as tfds.split_for_jax_process
        if train and shard is not None and shard.count > 1:
            split = tfds.even_splits(split, n=shard.count, drop_remainder=True)[shard.index]
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=train)
        ds = ds.map(lambda image, label: (image, tf.cast(label, tf.int32)))
        if names:  # num_examples also counts slices such as "train[:10%]"
            return ds, int(info.splits[split].num_examples)
        return ds, int(ds.reduce(0, lambda n, _: n + 1))

    train, train_size = load(train_split)
    val, val_size = None, 0
    if val_split:
        val, val_size = load(val_split)
    shape = info.features["image"].shape
    return DataSource(
        name=name,
        train=train,
        val=val,
        train_size=train_size,
        val_size=val_size,
        class_names=list(info.features["label"].names),
        image_shape=tuple(shape[:2]) if None not in shape[:2] else None,
    )


def _tfds_builder(name, *, data_dir, manual_dir, offline):
    """tfds' builder of `name`, prepared (from its manual_dir, or downloaded unless `offline`)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise BadInput(
            f"unknown tfds dataset {name!r} (see tfds.list_builders(), or use --data-dir)"
        ) from None
    if not builder.is_prepared():
        if offline and manual_dir is None:
            raise BadInput(
                f"dataset {name!r} is not prepared under {builder.data_dir} and --offline forbids "
                "downloading: prepare it there, or pass --manual-dir with its archive"
            )
        manual = os.fspath(manual_dir) if manual_dir else None
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual)
        )
    if "image" not in builder.info.features or "label" not in builder.info.features:
        raise BadInput(
            f"tfds dataset {name!r} is not an image classification set (needs 'image' and 'label')"
        )
    return builder


def _tfds_splits(name, names, splits):
    """(training split, validation split or None) of a set with splits `names`."""
    train_split, val_split = splits
    if val_split is None:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in names), None if names else "test")
    if val_split == "none":
        val_split = None
    for split in (train_split, val_split):
        if names and split is not None and split.split("[")[0] not in names:
            raise BadInput(f"dataset {name!r} has no split {split!r}; it has {', '.join(names)}")
    return train_split, val_split
