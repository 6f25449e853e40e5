"""One training run: data, model, devices, the run folder, fit, and what is saved.

A run folder holds config.json (the settings), backup/ (the state a killed run resumes
from), checkpoint.weights.h5 (after every epoch), history.csv (a row per finished epoch),
logs/ (TensorBoard), then model.keras (float32, stock layers) and metrics.json, last.
A new run writes into its folder as it goes, so a killed one resumes. A run with
--force over an earlier one trains in a staging folder beside it, and replaces the
earlier run only once it has finished: any failure or interruption leaves that intact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import keras

from convmixer_tf import contract, outputs
from convmixer_tf.augment import Augmenter
from convmixer_tf.data import DataSource, eval_pipeline, open_dataset, train_pipeline, warn_skipped
from convmixer_tf.errors import CheckFailed, one_line
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
    (*outputs.exactly("config.json", "history.csv", "metrics.json", "model.keras", "checkpoint.weights.h5",
                      "backup/", "backup/training_metadata.json", "backup/latest.weights.h5"),
     r"backup/process\d+/training_metadata\.json", r"backup/process\d+/latest\.weights\.h5",
     # TensorBoard's: events.out.tfevents.TIME.HOST.PID.N.v2
     r"logs/train/events\.out\.tfevents\.\d+\..+\.v2", r"logs/validation/events\.out\.tfevents\.\d+\..+\.v2"))


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

    Raises ValueError on bad settings or data (nothing trained), TrainingError when the
    loss became NaN or infinite.

    Example:
        >>> metrics = train(TrainConfig(dataset="cifar10", epochs=25, output="runs/c10"))  # doctest: +SKIP
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
    initial = contract.load_model(config.init, role="--init") if config.init else create_model(
        config.variant, include_preprocessing=True)
    size = config.image_size or initial.input_shape[1] or contract.info_of(initial).preprocessing.input_size
    scope, replicas, kind = distribution(config.distribute)
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} does not split over {replicas} devices")
    if source.train_size < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({source.train_size})")
    steps = min(source.train_size // config.batch_size, config.steps_per_epoch or source.train_size)
    run = Run(config, shard, source, size, replicas, kind, steps, log)
    log(f"{source.name}: {source.train_size} training / {source.val_size} validation images, "
        f"{source.num_classes} classes; {size} px, batch {config.batch_size}, {steps} steps per epoch, "
        f"{replicas} device(s) in {shard.count} process(es) ({kind}), {config.precision}")
    # Only now, with the data, the model and the devices checked: a bad argument leaves no folder.
    with run_folder(run):
        with scope:  # at the training size, the dataset's head, raw RGB in, the run's precision and devices
            model = rebuild(initial, (size, size, 3), num_classes=source.num_classes, raw_rgb=True,
                            dtype_policy=PRECISIONS[config.precision], synchronized_bn=kind == "mirrored")
            for layer in model.layers if config.freeze_backbone else ():
                layer.trainable = layer.name == contract.HEAD
            compile_model(model, config, steps)  # fp16 gets loss scaling: the model's policy says so
        del initial
        return _fit_and_save(run, model)


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
    staging = None
    if config.force and os.path.lexists(out):
        outputs.check_replaceable(out, RUN, True, inputs)
        if shard.index == 0:
            staging = outputs.Staging(out, RUN, True, inputs)
            try:
                staging.open()
            finally:  # the others wait for the path either way
                run.folder = broadcast_text(staging.path or "", shard)
            outputs.write_json_atomic(os.path.join(staging.path, "config.json"), settings)
        else:
            run.folder = broadcast_text("", shard)
            if not run.folder:
                raise ValueError(f"process 0 could not prepare the output {out}")
    else:
        outputs.check_inputs_outside(out, inputs)
        run.folder, run.resumed = out, _existing_run(out, settings, run.log)
        sync(shard, "output checked")
        if shard.index == 0 and not os.path.exists(os.path.join(out, "config.json")):
            os.makedirs(out, exist_ok=True)
            outputs.write_json_atomic(os.path.join(out, "config.json"), settings)
    try:
        sync(shard, "output ready")
        yield
        sync(shard, "run saved")
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
    if not os.path.exists(os.path.join(out, "config.json")):
        if not os.path.isdir(out) or os.listdir(out):
            raise ValueError(f"output {out} exists and is not a training run; use another --output")
        return False
    with open(os.path.join(out, "config.json")) as f:
        before = json.load(f)
    changed = sorted(k for k in settings if json.dumps(settings[k]) != json.dumps(before.get(k)))
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                         f"use --force to start over or another --output")
    resumed = os.path.isdir(os.path.join(out, "backup"))
    if resumed:
        log(f"resuming the interrupted run in {out}")
    return resumed


# --------------------------------------------------------------------------------------
# Fit and save

def _fit_and_save(run: Run, model) -> dict:
    config, shard, source = run.config, run.shard, run.source
    # timm's eval transform at the training size; no crop for a set of images already that size
    eval_pre = contract.info_of(model).preprocessing.replace(input_size=run.size)
    if source.image_shape is not None and tuple(source.image_shape) == (run.size, run.size):
        eval_pre = eval_pre.replace(crop_pct=1.0)
    progress, started = Progress(config.batch_size, run.log, config.verbose), time.perf_counter()
    with one_process_alone():  # each process its own augmentation stream, outside the model's layout
        augmenter = Augmenter(config.augment, run.size, source.num_classes, seed=config.seed + shard.index)
    validation = None
    if source.val is not None and source.val_size:
        cache = source.image_shape is not None and source.val_size * run.size ** 2 * 3 < 1 << 30
        # Under keras.distribution every batch is whole: it splits them over the devices itself.
        validation = eval_pipeline(source.val, eval_pre, config.batch_size, num_classes=source.num_classes,
                                   cache=cache, size=source.val_size,
                                   shard=shard if run.kind in ("data-parallel", "multi-process") else None)
        validation = validation.take(config.val_steps) if config.val_steps else validation
    with _losing_a_process_is_fatal(shard):
        model.fit(train_pipeline(source, augmenter, config.batch_size, seed=config.seed, shard=shard).repeat(),
                  epochs=config.epochs, steps_per_epoch=run.steps, validation_data=validation,
                  callbacks=_callbacks(run, progress), verbose=config.verbose if shard.index == 0 else 0, shuffle=False)
    metrics = _metrics(run, model, progress, started)
    sync(shard, "trained")
    if shard.count > 1:
        keras.distribution.set_distribution(None)  # the copy below is one process's, not the run's
    if shard.index == 0:  # one writer of the results
        final = rebuild(model, dtype_policy="float32")
        info = contract.info_of(final).replace(preprocessing=eval_pre, class_names=tuple(source.class_names))
        contract.save_model(final, os.path.join(run.folder, "model.keras"), info)
        shutil.rmtree(os.path.join(run.folder, "backup"), ignore_errors=True)
        outputs.follow_umask(run.folder)  # TensorBoard makes its folders 0755 whatever the umask
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


def _callbacks(run: Run, progress) -> list:
    folder, shard = run.folder, run.shard
    backup = os.path.join(folder, "backup", *([f"process{shard.index}"] if shard.count > 1 else []))
    callbacks = [StopOnNaN(folder), progress, LocalBackupAndRestore(backup, delete_checkpoint=False)]
    if shard.index == 0:  # what the run writes once
        # The history row before the backup: a kill between them re-trains that epoch
        # and read_history keeps its last row, so no finished epoch is lost.
        callbacks.insert(2, keras.callbacks.CSVLogger(os.path.join(folder, "history.csv"), append=True))
        callbacks.append(LocalModelCheckpoint(os.path.join(folder, "checkpoint.weights.h5"), save_weights_only=True))
    if shard.count > 1:
        callbacks.append(SameEpochEverywhere())
    if run.config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            run.log("TensorBoard is not installed (pip install tensorboard): no logs/ written")
        else:
            callbacks += [keras.callbacks.TensorBoard(os.path.join(folder, "logs"))] if shard.index == 0 else []
    return callbacks


def _metrics(run: Run, model, progress, started) -> dict:
    history = read_history(os.path.join(run.folder, "history.csv"))
    source = run.source
    return {
        "epochs": len(history), "final": history[-1] if history else {}, "history": history,
        "train_images_per_second": round(progress.images / progress.seconds, 2) if progress.seconds else None,
        "wall_seconds_this_session": round(time.perf_counter() - started, 2), "resumed": run.resumed,
        "epochs_this_session": progress.epochs,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "devices": run.replicas, "processes": run.shard.count, "distribution": run.kind,
        "backend": keras.backend.backend(), "dataset": source.name, "num_classes": source.num_classes,
        "class_names": source.class_names,
        "skipped_images": [{"file": path, "reason": reason} for path, reason in source.skipped],
        "image_size": run.size, "model": os.path.join(run.config.output, "model.keras"),
    }


class StopOnNaN(keras.callbacks.Callback):
    """Aborts at the first non-finite loss, before the epoch ends, so no checkpoint or
    backup ever holds the diverged weights."""

    def __init__(self, folder):
        super().__init__()
        self.folder, self._epoch = folder, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            checkpoint = os.path.join(self.folder, "checkpoint.weights.h5")
            kept = (f"the weights of the last finished epoch are in {checkpoint}" if os.path.exists(checkpoint)
                    else "no epoch finished")
            raise TrainingError(f"loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}: training "
                                f"stopped (lower --lr, keep --clip-norm, or use --precision fp32); {kept}")


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
