"""One training run: data, model, devices, the run folder, fit, and what is saved.

A run folder holds:

    config.json            the settings (a later run with other settings is refused)
    backup/                BackupAndRestore state: the same command resumes after a kill
    checkpoint.weights.h5  the weights after the last finished epoch
    history.csv            one row per finished epoch (kept across restarts)
    logs/                  TensorBoard
    model.keras            the trained model, float32, stock layers (written at the end)
    metrics.json           final metrics, per-epoch history, throughput (written last)

A new run writes into its folder as it goes, so a killed one resumes. A run with
--force over an earlier one trains in a staging folder beside it, and replaces the
earlier run only once it has finished: any failure or interruption leaves that intact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import keras

from convmixer_tf import contract, outputs
from convmixer_tf.augment import Augmenter
from convmixer_tf.cli import CheckFailed, one_line
from convmixer_tf.config import Preprocessing
from convmixer_tf.data import DataSource, eval_pipeline, open_dataset, train_pipeline, warn_skipped
from convmixer_tf.model import create_model, rebuild
from convmixer_tf.processes import (
    LocalBackupAndRestore,
    LocalModelCheckpoint,
    SameEpochEverywhere,
    Shard,
    broadcast_text,
    distribution,
    one_process_alone,
    start_processes,
    sync,
)
from convmixer_tf.train.optim import compile_model
from convmixer_tf.train.recipe import PRECISIONS, TrainConfig

RUN = outputs.Output(
    "convmixer_tf.train", "config.json",
    lambda settings: isinstance(settings, dict) and {"epochs", "batch_size"} <= set(settings),
    ("config.json", "history.csv", "metrics.json", "model.keras", "checkpoint.weights.h5", "backup/",
     "backup/training_metadata.json", "backup/latest.weights.h5", "backup/process*/training_metadata.json",
     "backup/process*/latest.weights.h5", "logs/train/events.out.tfevents.*",
     "logs/validation/events.out.tfevents.*"))


class TrainingError(CheckFailed):
    """The run started but cannot finish (diverged, ...): exit status 1."""


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
    folder: str = ""
    resumed: bool = False


def train(config: TrainConfig, log: Callable[[str], None] = print, source: Optional[DataSource] = None) -> dict:
    """Runs (or resumes) one training run; returns the final metrics (also in metrics.json).

    Raises:
        ValueError: bad settings or data (nothing trained).
        TrainingError: the loss became NaN or infinite.

    Example:
        >>> metrics = train(TrainConfig(dataset="cifar10", epochs=25,
        ...                             output="runs/c10"))     # doctest: +SKIP
    """
    config.validate()
    shard = start_processes(config)  # before anything touches JAX
    log = log if shard.index == 0 else (lambda message: None)  # the run speaks through process 0
    source = source or open_dataset(
        config.dataset, config.data_dir, tfds_data_dir=config.tfds_data_dir, manual_dir=config.manual_dir,
        offline=config.offline, train_split=config.train_split, val_split=config.val_split,
        val_fraction=config.val_fraction, seed=config.seed, strict_images=config.strict_images, shard=shard)
    warn_skipped(source, log)
    keras.utils.set_random_seed(config.seed)
    initial = starting_model(config)
    size = config.image_size or initial.input_shape[1] or contract.info_of(initial).preprocessing.input_size
    scope, replicas, kind = distribution(config.distribute)
    run = Run(config, shard, source, size, replicas, kind, _steps_per_epoch(config, source, replicas), log)
    log(f"{source.name}: {source.train_size} training / {source.val_size} validation images, "
        f"{source.num_classes} classes; {size} px, batch {config.batch_size}, {run.steps} steps per epoch, "
        f"{replicas} device(s) in {shard.count} process(es) ({kind}), {config.precision}")
    # Only now, with the data, the model and the devices checked: a bad argument leaves no folder.
    with run_folder(run):
        model = _training_model(run, initial, scope)
        del initial
        return _fit_and_save(run, model)


def starting_model(config: TrainConfig):
    """The model to start from: the init file, or a fresh variant (taking raw RGB)."""
    if config.init is not None:
        return contract.load_model(config.init, role="--init")
    return create_model(config.variant, include_preprocessing=True)


def _steps_per_epoch(config: TrainConfig, source: DataSource, replicas: int) -> int:
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} does not split over {replicas} devices")
    steps = source.train_size // config.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({source.train_size})")
    return min(steps, config.steps_per_epoch or steps)


def _training_model(run: Run, initial, scope):
    """The model to fit: `initial` at the training size, with the dataset's head, taking raw
    RGB, under the run's precision and devices, compiled."""
    with scope:
        model = rebuild(initial, (run.size, run.size, 3), num_classes=run.source.num_classes, raw_rgb=True,
                        dtype_policy=PRECISIONS[run.config.precision], synchronized_bn=run.kind == "mirrored")
        if run.config.freeze_backbone:
            for layer in model.layers:
                layer.trainable = layer.name == contract.HEAD
        compile_model(model, run.config, run.steps)  # fp16 gets loss scaling: the model's policy says so
    return model


# --------------------------------------------------------------------------------------
# The run folder


@contextlib.contextmanager
def run_folder(run: Run):
    """Sets `run.folder` (and `run.resumed`) for the duration of the run.

    A new or unfinished run of the same settings is written (or resumed) in its output
    folder. With --force, a run over an earlier output (of this command, holding none of
    the run's inputs; anything else is refused, exit 2) trains in a staging folder that
    replaces the earlier output once the run has finished. Every process of a run checks
    the same folder (it must reach it: one host, or a shared file system).
    """
    config, shard = run.config, run.shard
    out = os.path.abspath(config.output)
    settings = {k: v for k, v in config.to_dict().items() if k not in TrainConfig.PER_PROCESS}
    inputs = [config.init, config.data_dir, config.tfds_data_dir, config.manual_dir]
    if config.force and os.path.lexists(out):
        with _staged_run(run, out, inputs, settings):
            yield
        return
    outputs.check_inputs_outside(out, inputs)
    run.folder, run.resumed = out, _existing_run(out, settings, run.log)
    sync(shard, "output checked")
    if shard.index == 0 and not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(out, exist_ok=True)
        outputs.write_json_atomic(os.path.join(out, "config.json"), settings)
    sync(shard, "output ready")
    yield
    sync(shard, "run saved")


@contextlib.contextmanager
def _staged_run(run: Run, out, inputs, settings):
    outputs.check_replaceable(out, RUN, True, inputs)
    staging = None
    if run.shard.index == 0:
        staging = outputs.Staging(out, RUN, True, inputs)
        try:
            staging.open()
        finally:
            path = broadcast_text(staging.path or "", run.shard)  # the others wait for it either way
        outputs.write_json_atomic(os.path.join(staging.path, "config.json"), settings)
    else:
        path = broadcast_text("", run.shard)
        if not path:
            raise ValueError(f"process 0 could not prepare the output {out}")
    run.folder = path
    try:
        sync(run.shard, "output ready")
        yield
        sync(run.shard, "run saved")
        if staging is not None:
            staging.commit()
    except BaseException:
        if staging is not None:
            staging.discard()
        raise


def _existing_run(out, settings, log) -> bool:
    """For an output that may exist: True to resume it, False to start it, or a
    ValueError saying why neither."""
    if not os.path.lexists(out):
        return False
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise ValueError(f"{out} already holds a finished run; use --force to start over or another --output")
    settings_path = os.path.join(out, "config.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            before = json.load(f)
        changed = sorted(k for k in settings if json.dumps(settings[k]) != json.dumps(before.get(k)))
        if changed:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                             f"use --force to start over or another --output")
        resumed = os.path.isdir(os.path.join(out, "backup"))
        if resumed:
            log(f"resuming the interrupted run in {out}")
        return resumed
    if not os.path.isdir(out) or os.listdir(out):
        raise ValueError(f"output {out} exists and is not a training run; use another --output")
    return False


# --------------------------------------------------------------------------------------
# Fit and save


def _fit_and_save(run: Run, model) -> dict:
    config, shard = run.config, run.shard
    eval_pre = _eval_preprocessing(contract.info_of(model).preprocessing, run.size, run.source)
    progress = Progress(config.batch_size, run.log, config.verbose)
    started = time.perf_counter()
    with one_process_alone():  # each process its own augmentation stream, outside the model's layout
        augmenter = Augmenter(config.augment, run.size, run.source.num_classes, seed=config.seed + shard.index)
    train_data = train_pipeline(run.source, augmenter, config.batch_size, seed=config.seed, shard=shard).repeat()
    with _losing_a_process_is_fatal(shard):
        model.fit(train_data, epochs=config.epochs, steps_per_epoch=run.steps,
                  validation_data=_val_data(run, eval_pre), callbacks=_callbacks(run, progress),
                  verbose=config.verbose if shard.index == 0 else 0, shuffle=False)
    metrics = _metrics(run, model, progress, started)
    sync(shard, "trained")
    if shard.count > 1:
        keras.distribution.set_distribution(None)  # the copy below is one process's, not the run's
    if shard.index == 0:  # one writer of the results
        final = rebuild(model, dtype_policy="float32")
        info = contract.info_of(final).replace(preprocessing=eval_pre, class_names=tuple(run.source.class_names))
        contract.save_model(final, os.path.join(run.folder, "model.keras"), info)
        shutil.rmtree(os.path.join(run.folder, "backup"), ignore_errors=True)
        outputs.write_json_atomic(os.path.join(run.folder, "metrics.json"), metrics)
    return metrics


@contextlib.contextmanager
def _losing_a_process_is_fatal(shard: Shard):
    """A collective that fails in a multi-process run (another process died or stopped
    answering) becomes a TrainingError that says so."""
    try:
        yield
    except (CheckFailed, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - the runtime's errors come as many types
        if shard.count == 1:
            raise
        raise TrainingError(f"process {shard.index} of {shard.count} lost the run ({one_line(err)[:300]}); "
                            "another process stopped. Start every process again with the same command to resume "
                            "from the last finished epoch") from None


def _eval_preprocessing(preprocessing: Preprocessing, size: int, source: DataSource) -> Preprocessing:
    """timm's eval transform at the training size; no crop for a set of images already that size."""
    pre = preprocessing.replace(input_size=size)
    if source.image_shape is not None and tuple(source.image_shape) == (size, size):
        pre = pre.replace(crop_pct=1.0)
    return pre


def _val_data(run: Run, preprocessing: Preprocessing):
    source = run.source
    if source.val is None or not source.val_size:
        return None
    size = preprocessing.input_size
    cache = source.image_shape is not None and source.val_size * size * size * 3 < 1 << 30
    # Under keras.distribution every batch is whole: it splits them over the devices itself.
    shard = run.shard if run.kind in ("data-parallel", "multi-process") else None
    val_ds = eval_pipeline(source.val, preprocessing, run.config.batch_size, num_classes=source.num_classes,
                           cache=cache, shard=shard, size=source.val_size)
    return val_ds.take(run.config.val_steps) if run.config.val_steps else val_ds


def _callbacks(run: Run, progress) -> list:
    folder, shard, config = run.folder, run.shard, run.config
    backup = os.path.join(folder, "backup", f"process{shard.index}") if shard.count > 1 else os.path.join(folder,
                                                                                                            "backup")
    callbacks = [StopOnNaN(folder), progress]
    if shard.index == 0:  # what the run writes once
        # The history row first, then the backup: a kill between them re-trains that
        # epoch and read_history keeps its last row, so no finished epoch is lost.
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(folder, "history.csv"), append=True))
    callbacks.append(LocalBackupAndRestore(backup, delete_checkpoint=False))  # every process its own
    if shard.index == 0:
        callbacks.append(LocalModelCheckpoint(os.path.join(folder, "checkpoint.weights.h5"), save_weights_only=True))
    if shard.count > 1:
        callbacks.append(SameEpochEverywhere())
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        run.log("TensorBoard is not installed (pip install tensorboard): no logs/ written")
    elif config.tensorboard and shard.index == 0:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(folder, "logs")))
    return callbacks


def _metrics(run: Run, model, progress, started) -> dict:
    history = read_history(os.path.join(run.folder, "history.csv"))
    source = run.source
    return {
        "epochs": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "train_images_per_second": round(progress.images / progress.seconds, 2) if progress.seconds else None,
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


class StopOnNaN(keras.callbacks.Callback):
    """Aborts at the first non-finite loss, before the epoch ends, so no checkpoint or
    backup ever holds the diverged weights."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            checkpoint = os.path.join(self.folder, "checkpoint.weights.h5")
            kept = (f"the weights of the last finished epoch are in {checkpoint}" if os.path.exists(checkpoint)
                    else "no epoch finished")
            raise TrainingError(
                f"loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}: training stopped "
                f"(lower --lr, keep --clip-norm, or use --precision fp32); {kept}")


class Progress(keras.callbacks.Callback):
    """Counts trained images and time (throughput for metrics.json) and reports epochs
    to `log` when Keras' own progress bar is off."""

    def __init__(self, batch_size, log, verbose):
        super().__init__()
        self.batch_size, self.log, self.verbose = batch_size, log, verbose
        self.images, self.seconds, self.epochs, self._start, self._steps = 0, 0.0, 0, None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.images += self._steps * self.batch_size
        self.epochs += 1
        self.seconds += elapsed
        if self.verbose == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items()) if k != "learning_rate")
            self.log(f"epoch {epoch + 1}/{self.params.get('epochs')}: {shown} ({elapsed:.1f} s)")


def read_history(path) -> list:
    """history.csv as a list of per-epoch dicts; an epoch trained twice (a kill between
    its row and its backup) keeps its last row."""
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
    return [rows[e] for e in sorted(rows)]

