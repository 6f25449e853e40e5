"""Training and evaluation batches: shuffled and augmented for training, timm's eval
transform for evaluation, and each process's share of the data when several train one
model together (`Shard`): every example once per epoch over all processes, in equal
batches (collectives need them).

Every source yields unbatched (uint8 HxWx3 image, int32 label) pairs (`convmixer_tf.data`);
the batches are raw float32 pixels, because every model trained here normalises inside
its graph (the `preprocessing` layer).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from convmixer_tf.config import Preprocessing
from convmixer_tf.data import DataSource
from convmixer_tf.errors import BadInput
from convmixer_tf.images import decode_file, eval_transform

# decoded sets this small stay in memory (CIFAR-10's training set: 150 MB)
CACHE_LIMIT_BYTES = 2 << 30
# examples a tfds training set is shuffled through
SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's place among the processes that train one model together."""

    index: int = 0
    count: int = 1


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a training set's examples in one epoch: the same in every process."""
    return np.random.default_rng([seed, int(epoch)]).permutation(count)


def shard_of_epoch(order: np.ndarray, global_batch: int, shard: Shard) -> np.ndarray:
    """The examples one process trains on in an epoch of `order`: in each global batch, its
    own run of global_batch / count places. Only whole global batches are used (like
    drop_remainder), so the processes' shards are disjoint, equal, and together they are
    exactly the batches a single process would train on, in the same order."""
    local = global_batch // shard.count
    places = np.arange(len(order) // global_batch * global_batch)
    return order[places[(places // local) % shard.count == shard.index]]


def folder_epochs(files, batch_size: int, shard: Shard, seed: int):
    """Decoded (image, label) pairs of this process's share of every epoch of an image
    folder's (paths, labels), epoch after epoch."""
    import tensorflow as tf

    paths = tf.constant([os.fsencode(path) for path in files[0]])
    labels = tf.constant(np.asarray(files[1], np.int32))
    count = len(files[0])

    def indices(epoch):
        return shard_of_epoch(epoch_order(count, seed, epoch), batch_size, shard).astype(np.int64)

    def epoch_dataset(epoch):
        chosen = tf.ensure_shape(tf.numpy_function(indices, [epoch], tf.int64), [None])
        return tf.data.Dataset.from_tensor_slices(chosen)

    ds = tf.data.Dataset.range(1 << 62).flat_map(epoch_dataset)
    return ds.map(
        lambda i: decode_file(tf.gather(paths, i), tf.gather(labels, i)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def train_pipeline(
    source: DataSource,
    augmenter,
    batch_size: int,
    *,
    seed: int = 0,
    shard: Shard = Shard(),
):
    """Shuffled, augmented, batched training data: (float32 raw pixels, one-hot labels),
    in batches of batch_size / shard.count (this process's share of the global batch).

    An image folder is reshuffled every epoch by index and only this process's (`shard`,
    a `Shard`) examples are decoded (`folder_epochs`); a tfds set
    (opened with the same shard: its own even split) is shuffled through a buffer.
    Decoding and augmentation run in parallel, batches are prefetched, small fixed-size
    sets are cached decoded. The last partial batch is dropped: every step has one shape.
    """
    import tensorflow as tf

    if batch_size % shard.count:
        raise BadInput(f"batch_size {batch_size} does not split over {shard.count} processes")
    ordered = source.train_files is not None  # keeps each epoch's examples in their epoch
    if ordered:
        ds = folder_epochs(source.train_files, batch_size, shard, seed)
    else:
        ds = source.train
        if (
            source.image_shape is not None
            and source.train_size * np.prod(source.image_shape) * 3 <= CACHE_LIMIT_BYTES
        ):
            ds = ds.cache()
        ds = ds.shuffle(
            min(SHUFFLE_BUFFER, max(source.train_size, 1)), seed=seed, reshuffle_each_iteration=True
        )
    ds = ds.map(augmenter.image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    ds = ds.batch(
        batch_size // shard.count, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE
    )
    if augmenter.mixers:
        ds = ds.map(augmenter.batch, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_pipeline(
    dataset,
    preprocessing: Preprocessing,
    batch_size: int,
    *,
    num_classes: Optional[int] = None,
    normalize: bool = False,
    cache: bool = False,
    shard=None,
    size: Optional[int] = None,
):
    """Batched evaluation data with timm's transform (resize by crop_pct, centre crop).

    Yields (float32 images, labels): raw pixels unless normalize=True (for a model
    without its own preprocessing layer); labels one-hot when num_classes is given,
    else int32. With `shard` (several processes, `size` examples, one-hot labels), this
    process's share: every example exactly once over all processes, each process the same
    number of equal batches (collectives need them), the difference made up by blank
    examples of weight 0; it yields (images, labels, sample weights).
    """
    import tensorflow as tf

    side = preprocessing.input_size

    def transform(image, label):
        x = eval_transform(image, preprocessing, normalize)
        x.set_shape([side, side, 3])
        return x, (tf.one_hot(label, num_classes) if num_classes else label)

    ds = dataset if shard is None else dataset.shard(shard.count, shard.index)
    ds = ds.cache() if cache else ds
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if shard is None:
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    local = batch_size // shard.count
    mine = len(range(shard.index, size, shard.count))
    padded = math.ceil(math.ceil(size / shard.count) / local) * local
    blank = (tf.zeros([side, side, 3]), tf.zeros([num_classes]), tf.constant(0.0))
    ds = ds.map(lambda image, label: (image, label, tf.constant(1.0)))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padded - mine))
    return ds.batch(local).prefetch(tf.data.AUTOTUNE)
