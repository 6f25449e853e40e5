"""Training on several devices and processes: the distribution, JAX's distributed runtime,
and what each process saves on its own.

Several processes (JAX's runtime, `keras.distribution`) train one model: every global
batch is split over the devices of all of them. The model's state is laid out over every
device and must be identical in each process; a process's data (its shard,
`convmixer_tf.pipelines`, and its augmentation stream) is its own and stays out of that
layout (`one_process_alone`).
"""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np

from convmixer_tf.errors import BadInput, CheckFailed
from convmixer_tf.pipelines import Shard

MULTI_PROCESS_ON_TENSORFLOW = (
    "--distribute multi-process needs the JAX backend (KERAS_BACKEND=jax): TensorFlow's "
    "MultiWorkerMirroredStrategy does not work with Keras 3's fit (keras-team/keras#20585; see the README)"
)


def start_processes(config) -> Shard:
    """Joins the processes of a multi-process run (JAX's distributed runtime, through
    keras.distribution.initialize); returns this process's place. Call before anything
    touches JAX. Other runs: Shard(0, 1).

    The coordinator, the process count and this process's index come from the config,
    or from SLURM / Open MPI, which JAX reads itself. CPU collectives go through gloo. A
    process that stops answering for config.heartbeat_timeout seconds counts as dead,
    and the runtime stops the others.
    """
    if config.distribute != "multi-process":
        return Shard()
    if keras.backend.backend() != "jax":
        raise BadInput(MULTI_PROCESS_ON_TENSORFLOW)
    import jax

    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # keras.distribution.initialize passes no timeouts on to jax.distributed.initialize
        # (whose heartbeat default is 100 s): they are bound here for the duration of the call.
        original = jax.distributed.initialize
        jax.distributed.initialize = functools.partial(
            original, heartbeat_timeout_seconds=config.heartbeat_timeout
        )
        try:
            keras.distribution.initialize(
                config.coordinator, config.num_processes, config.process_id
            )
        finally:
            jax.distributed.initialize = original
    return Shard(jax.process_index(), jax.process_count())


def sync(shard: Shard, name: str) -> None:
    """Waits until every process of the run gets here (nothing to wait for alone)."""
    if shard.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_text(text: str, shard: Shard) -> str:
    """Process 0's `text` (a path, up to 4 KiB of UTF-8), in every process."""
    if shard.count == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode().ljust(4096, b"\0"), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).rstrip(b"\0").decode()


def distribution(kind: str = "auto"):
    """(context manager to build and compile in, number of replicas, kind) for `kind`, one of
    DISTRIBUTIONS (`TrainConfig.validate` checks it).

    "mirrored": tf.distribute.MirroredStrategy over the GPUs, or the (logical) CPUs
    when there is no GPU; BatchNorm is synchronised over replicas so the numbers do not
    depend on the device count. "data-parallel": keras.distribution.DataParallel over
    all JAX devices (batch split, global BatchNorm statistics); "multi-process" the same
    over the devices of every process (after `start_processes`). "auto" picks one of
    them when the backend sees several accelerators, else "none".
    """
    backend = keras.backend.backend()
    if kind == "auto":
        kind = "none"
        if backend == "tensorflow":
            import tensorflow as tf

            kind = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
        elif backend == "jax":
            import jax

            kind = (
                "data-parallel"
                if len([d for d in jax.devices() if d.platform != "cpu"]) > 1
                else "none"
            )
    if kind == "none":
        return contextlib.nullcontext(), 1, kind
    if kind == "mirrored":
        if backend != "tensorflow":
            raise BadInput(
                f"--distribute mirrored needs the TensorFlow backend (KERAS_BACKEND is {backend})"
            )
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope(), strategy.num_replicas_in_sync, kind
    # "data-parallel" or "multi-process"
    if backend != "jax":
        raise BadInput(f"--distribute {kind} needs the JAX backend (KERAS_BACKEND is {backend})")
    devices = keras.distribution.list_devices()  # every process's, after start_processes
    # Several processes: each feeds its own shard (`pipelines.train_pipeline`), not Keras'
    # auto-shard, which would have every process decode and augment the whole set.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=kind != "multi-process")
    )
    return contextlib.nullcontext(), len(devices), kind


@contextlib.contextmanager
def one_process_alone():
    """Runs a block as this process's own business, outside the distributed layout: what
    it creates (a saving callback's throwaway objects, the augmentation layers' random
    state, which differs per process) is not the model's state, which every process
    must create together and identically."""
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


class _SavesAlone:
    """A saving callback whose saves are this process's own business (see above)."""

    def _save_model(self, *args, **kwargs):
        with one_process_alone():
            return super()._save_model(*args, **kwargs)


class LocalModelCheckpoint(_SavesAlone, keras.callbacks.ModelCheckpoint):
    pass


class LocalBackupAndRestore(_SavesAlone, keras.callbacks.BackupAndRestore):
    pass


class SameEpochEverywhere(keras.callbacks.Callback):
    """After BackupAndRestore, checks that every process resumes at the same epoch (a kill
    that lands between two processes' backups would leave them one epoch apart)."""

    def on_train_begin(self, logs=None):
        from jax.experimental import multihost_utils

        epoch = np.asarray([self.model._initial_epoch or 0], np.int32)
        epochs = np.asarray(multihost_utils.process_allgather(epoch)).reshape(-1).tolist()
        if len(set(epochs)) > 1:
            raise CheckFailed(
                f"the processes' backups are at different epochs ({epochs}): the run cannot resume "
                "in step; start over with --force"
            )
