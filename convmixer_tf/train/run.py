"""One training run: data, model, devices, the run folder, fit, and what is saved.

A run folder (`train.folder`) holds config.json (the settings), backup/ (the state a
killed run resumes from), checkpoint.weights.h5 (after every epoch), history.csv (a row
per finished epoch), logs/ (TensorBoard), then model.keras (float32, stock layers) and
metrics.json, last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from typing import Callable, Optional

import keras

from convmixer_tf import outputs
from convmixer_tf.augment import Augmenter
from convmixer_tf.config import HEAD
from convmixer_tf.data import DataSource, open_dataset, warn_skipped
from convmixer_tf.errors import BadInput, CheckFailed, one_line
from convmixer_tf.facts import attach, facts_of
from convmixer_tf.model import build_variant, rebuild
from convmixer_tf.pipelines import Shard, eval_pipeline, train_pipeline
from convmixer_tf.saving import load_model, save_model
from convmixer_tf.train.callbacks import Progress, StopOnNaN, TrainingError, read_history
from convmixer_tf.train.distribute import (
    LocalBackupAndRestore,
    LocalModelCheckpoint,
    SameEpochEverywhere,
    distribution,
    one_process_alone,
    start_processes,
    sync,
)
from convmixer_tf.train.folder import FlushedTensorBoard, RunRecord, run_folder
from convmixer_tf.train.optim import compile_model
from convmixer_tf.train.recipe import PRECISIONS, TrainConfig


@dataclasses.dataclass
class Run:
    """One run's state, as the steps after set-up see it."""

    config: TrainConfig
    shard: Shard
    source: DataSource
    size: int
    replicas: int
    kind: str
    steps: int
    log: Callable[[str], None]
    scope: object = contextlib.nullcontext()  # where the model is built: its devices' strategy
    folder: str = ""
    resumed: bool = False
    record: Optional[RunRecord] = None  # of a run written in place, in process 0


def train(
    config: TrainConfig, log: Callable[[str], None] = print, source: Optional[DataSource] = None
) -> dict:
    """Runs (or resumes) one training run; returns the final metrics (also in metrics.json).

    Raises BadInput on bad settings or data (nothing trained), TrainingError when the
    loss became NaN or infinite.

    Example:
        >>> metrics = train(TrainConfig(dataset="cifar10", epochs=25, output="runs/c10"))  # doctest: +SKIP
    """
    config.validate()
    shard = start_processes(config)  # before anything touches JAX
    if shard.index != 0:
        log = lambda message: None  # the run speaks through process 0
    source = source or _open(config, shard)
    warn_skipped(source, log)
    keras.utils.set_random_seed(config.seed)
    if config.init:
        initial = load_model(config.init, role="--init")
    else:
        initial = build_variant(config.variant, include_preprocessing=True)
    run = _plan(config, shard, source, initial, log)
    # Only now, with the data, the model and the devices checked: a bad argument leaves no folder.
    with run_folder(config, shard, log) as (folder, resumed, record):
        run = dataclasses.replace(run, folder=folder, resumed=resumed, record=record)
        model = _trainable(run, initial)
        del initial
        return _fit_and_save(run, model)


def _open(config: TrainConfig, shard: Shard) -> DataSource:
    return open_dataset(
        config.dataset,
        config.data_dir,
        tfds_data_dir=config.tfds_data_dir,
        manual_dir=config.manual_dir,
        offline=config.offline,
        train_split=config.train_split,
        val_split=config.val_split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        strict_images=config.strict_images,
        shard=shard,
    )


def _plan(config: TrainConfig, shard: Shard, source: DataSource, initial, log) -> Run:
    """The run's size, devices and steps, checked against the data; said in one line."""
    pre = facts_of(initial).preprocessing
    size = config.image_size or initial.input_shape[1] or pre.input_size
    scope, replicas, kind = distribution(config.distribute)
    if config.batch_size % replicas:
        raise BadInput(f"batch_size {config.batch_size} does not split over {replicas} devices")
    if source.train_size < config.batch_size:
        raise BadInput(
            f"batch_size {config.batch_size} is larger than the training set ({source.train_size})"
        )
    steps = min(source.train_size // config.batch_size, config.steps_per_epoch or source.train_size)
    log(
        f"{source.name}: {source.train_size} training / {source.val_size} validation images, "
        f"{source.num_classes} classes; {size} px, batch {config.batch_size}, {steps} steps per epoch, "
        f"{replicas} device(s) in {shard.count} process(es) ({kind}), {config.precision}"
    )
    return Run(config, shard, source, size, replicas, kind, steps, log, scope=scope)


def _trainable(run: Run, initial):
    """The model to train: at the training size, the dataset's head, raw RGB in, the run's
    precision, built and compiled on its devices."""
    config = run.config
    with run.scope:
        model = rebuild(
            initial,
            (run.size, run.size, 3),
            num_classes=run.source.num_classes,
            raw_rgb=True,
            dtype_policy=PRECISIONS[config.precision],
            synchronized_bn=run.kind == "mirrored",
        )
        if config.freeze_backbone:
            for layer in model.layers:
                layer.trainable = layer.name == HEAD
        # fp16 gets loss scaling: the model's policy says so
        compile_model(model, config, run.steps)
    return model


# --------------------------------------------------------------------------------------
# Fit and save


def _fit_and_save(run: Run, model) -> dict:
    shard = run.shard
    # timm's eval transform at the training size; no crop for a set of images already that size
    eval_pre = facts_of(model).preprocessing.replace(input_size=run.size)
    if run.source.image_shape is not None and tuple(run.source.image_shape) == (run.size, run.size):
        eval_pre = eval_pre.replace(crop_pct=1.0)
    progress = Progress(run.log, run.config.verbose)
    started = time.perf_counter()
    with _losing_a_process_is_fatal(shard):
        model.fit(
            _training_data(run),
            epochs=run.config.epochs,
            steps_per_epoch=run.steps,
            validation_data=_validation_data(run, eval_pre),
            callbacks=_callbacks(run, progress),
            verbose=run.config.verbose if shard.index == 0 else 0,
            shuffle=False,
        )
    metrics = _metrics(run, model, progress, started)
    sync(shard, "trained")
    if shard.count > 1:
        keras.distribution.set_distribution(None)  # the copy below is one process's, not the run's
    if shard.index == 0:  # one writer of the results
        _save(run, model, eval_pre, metrics)
    return metrics


def _training_data(run: Run):
    config, shard = run.config, run.shard
    # each process its own augmentation stream, outside the model's layout
    with one_process_alone():
        augmenter = Augmenter(
            config.augment, run.size, run.source.num_classes, seed=config.seed + shard.index
        )
    return train_pipeline(
        run.source, augmenter, config.batch_size, seed=config.seed, shard=shard
    ).repeat()


def _validation_data(run: Run, eval_pre):
    source = run.source
    if source.val is None or not source.val_size:
        return None
    cache = source.image_shape is not None and source.val_size * run.size**2 * 3 < 1 << 30
    # Under keras.distribution every batch is whole: it splits them over the devices itself.
    sharded = run.kind in ("data-parallel", "multi-process")
    validation = eval_pipeline(
        source.val,
        eval_pre,
        run.config.batch_size,
        num_classes=source.num_classes,
        cache=cache,
        size=source.val_size,
        shard=run.shard if sharded else None,
    )
    if run.config.val_steps:
        return validation.take(run.config.val_steps)
    return validation


def _save(run: Run, model, eval_pre, metrics) -> None:
    """model.keras (float32, with its facts), then metrics.json, last: the run is finished."""
    final = rebuild(model, dtype_policy="float32")
    facts = facts_of(final).replace(
        preprocessing=eval_pre, class_names=tuple(run.source.class_names)
    )
    save_model(attach(final, facts), os.path.join(run.folder, "model.keras"))
    shutil.rmtree(os.path.join(run.folder, "backup"), ignore_errors=True)
    outputs.follow_umask(run.folder)  # TensorBoard makes its folders 0755 whatever the umask
    outputs.write_json_atomic(os.path.join(run.folder, "metrics.json"), metrics)


@contextlib.contextmanager
def _losing_a_process_is_fatal(shard: Shard):
    """A collective that fails in a multi-process run (another process died or stopped
    answering) becomes a TrainingError that says so."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the runtime's errors come as many types
        if shard.count == 1 or isinstance(err, CheckFailed):
            raise
        raise TrainingError(
            f"process {shard.index} of {shard.count} lost the run ({one_line(err)[:300]}); "
            "another process stopped. Start every process again with the same command to resume "
            "from the last finished epoch"
        ) from None


def _callbacks(run: Run, progress) -> list:
    folder, shard = run.folder, run.shard
    backup = os.path.join(folder, "backup", *([f"process{shard.index}"] if shard.count > 1 else []))
    callbacks = [
        StopOnNaN(folder),
        progress,
        LocalBackupAndRestore(backup, delete_checkpoint=False),
    ]
    if shard.index == 0:  # what the run writes once
        # The history row before the backup: a kill between them re-trains that epoch
        # and read_history keeps its last row, so no finished epoch is lost.
        callbacks.insert(
            2, keras.callbacks.CSVLogger(os.path.join(folder, "history.csv"), append=True)
        )
        callbacks.append(
            LocalModelCheckpoint(
                os.path.join(folder, "checkpoint.weights.h5"), save_weights_only=True
            )
        )
    if shard.count > 1:
        callbacks.append(SameEpochEverywhere())
    if run.config.tensorboard and shard.index == 0:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            run.log("TensorBoard is not installed (pip install tensorboard): no logs/ written")
        else:
            callbacks.append(FlushedTensorBoard(os.path.join(folder, "logs")))
    if run.record is not None:
        callbacks.append(run.record)  # last: after every file of the epoch is written
    return callbacks


def _metrics(run: Run, model, progress, started) -> dict:
    history = read_history(os.path.join(run.folder, "history.csv"))
    source = run.source
    images = progress.epochs * run.steps * run.config.batch_size
    return {
        "epochs": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "train_images_per_second": round(images / progress.seconds, 2)
        if progress.seconds
        else None,
        "wall_seconds_this_session": round(time.perf_counter() - started, 2),
        "resumed": run.resumed,
        "epochs_this_session": progress.epochs,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "devices": run.replicas,
        "processes": run.shard.count,
        "distribution": run.kind,
        "backend": keras.backend.backend(),
        "dataset": source.name,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "skipped_images": [{"file": path, "reason": reason} for path, reason in source.skipped],
        "image_size": run.size,
        "model": os.path.join(run.config.output, "model.keras"),
    }
