"""Training and fine-tuning: the paper's recipe on tfds sets or image folders.

`train(TrainConfig(...))` is the whole job; `python -m convmixer_tf.train` only parses
arguments into a TrainConfig. A run writes into its output folder:

    config.json            the settings (a later run with other settings is refused)
    backup/                BackupAndRestore state: the same command resumes after a kill
    checkpoint.weights.h5  the weights after the last finished epoch
    history.csv            one row per finished epoch (kept across restarts)
    logs/                  TensorBoard
    model.keras            the trained model, float32, stock layers (written at the end)
    metrics.json           final metrics, per-epoch history, throughput (written last)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import keras
import numpy as np

from convmixer_tf import common, contract
from convmixer_tf.augment import Augmenter
from convmixer_tf.common import CheckFailed, write_json_atomic
from convmixer_tf.config import Preprocessing, get_variant
from convmixer_tf.data import (
    DataSource,
    Shard,
    eval_pipeline,
    open_dataset,
    sharded_eval_pipeline,
    train_pipeline,
    warn_skipped,
)
from convmixer_tf.model import ConvMixer, config_from_model
from convmixer_tf.recipe import DISTRIBUTIONS, PRECISIONS, TrainConfig  # noqa: F401  (TrainConfig: public here too)


class TrainingError(CheckFailed):
    """The run started but cannot finish (diverged, ...): exit status 1."""


# --------------------------------------------------------------------------------------
# Learning rate, optimiser


@keras.saving.register_keras_serializable(package="convmixer_tf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's one-cycle schedule, per step: 0 -> peak at 2/5 of training ->
    peak/20 at 4/5 -> 0 at the end, linear in between (np.interp of the CIFAR repo)."""

    def __init__(self, peak: float, total_steps: int):
        self.peak, self.total_steps = float(peak), int(total_steps)

    def __call__(self, step):
        t = keras.ops.cast(step, "float32") / float(max(self.total_steps, 1))
        ramp_up = self.peak * t / 0.4
        ramp_down = self.peak + (self.peak / 20 - self.peak) * (t - 0.4) / 0.4
        tail = self.peak / 20 * (1.0 - t) / 0.2
        lr = keras.ops.where(t < 0.4, ramp_up, keras.ops.where(t < 0.8, ramp_down, tail))
        return keras.ops.maximum(lr, 0.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


def learning_rate(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    """The schedule of `config` over `total_steps` optimiser steps."""
    if config.schedule == "onecycle":
        return OneCycle(config.lr, total_steps)
    if config.schedule == "cosine":
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else config.lr, decay_steps=max(total_steps - warmup, 1),
            warmup_target=config.lr if warmup else None, warmup_steps=warmup)
    return config.lr


@keras.saving.register_keras_serializable(package="convmixer_tf")
class BackboneScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is multiplied by `backbone_lr_mult` for every variable
    outside the layers named in `full_lr_layers` (the new head, when fine-tuning).
    Weight decay keeps the full rate, as in decoupled AdamW."""

    def __init__(self, backbone_lr_mult: float = 1.0, full_lr_layers=("head",), **kwargs):
        super().__init__(**kwargs)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.full_lr_layers = tuple(full_lr_layers)

    def build(self, variables):
        super().build(variables)
        # By index: update_step may see the backend's variable rather than the Keras one.
        self._scaled = [v.path.split("/")[0] not in self.full_lr_layers for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self._scaled[self._get_variable_index(variable)]:
            learning_rate = keras.ops.cast(learning_rate, variable.dtype) * self.backbone_lr_mult
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return dict(super().get_config(), backbone_lr_mult=self.backbone_lr_mult,
                    full_lr_layers=list(self.full_lr_layers))


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    kwargs = dict(learning_rate=learning_rate(config, total_steps, steps_per_epoch),
                  weight_decay=config.weight_decay, global_clipnorm=config.clip_norm)
    if config.backbone_lr_mult != 1.0:
        return BackboneScaledAdamW(backbone_lr_mult=config.backbone_lr_mult, **kwargs)
    return keras.optimizers.AdamW(**kwargs)


# --------------------------------------------------------------------------------------
# Devices


MULTI_PROCESS_ON_TENSORFLOW = (
    "--distribute multi-process needs the JAX backend (KERAS_BACKEND=jax): TensorFlow's "
    "MultiWorkerMirroredStrategy does not work with Keras 3's fit (keras-team/keras#20585; see the README)")


def start_processes(config: TrainConfig) -> Shard:
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
        raise ValueError(MULTI_PROCESS_ON_TENSORFLOW)
    import jax

    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # keras.distribution.initialize passes no timeouts on to jax.distributed.initialize
        # (whose heartbeat default is 100 s): they are bound here for the duration of the call.
        original = jax.distributed.initialize
        jax.distributed.initialize = functools.partial(original, heartbeat_timeout_seconds=config.heartbeat_timeout)
        try:
            keras.distribution.initialize(config.coordinator, config.num_processes, config.process_id)
        finally:
            jax.distributed.initialize = original
    return Shard(jax.process_index(), jax.process_count())


def sync(shard: Shard, name: str) -> None:
    """Waits until every process of the run gets here (nothing to wait for alone)."""
    if shard.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def distribution(kind: str = "auto"):
    """(context manager to build and compile in, number of replicas) for `kind`.

    "mirrored": tf.distribute.MirroredStrategy over the GPUs, or the (logical) CPUs
    when there is no GPU; BatchNorm is synchronised over replicas so the numbers do not
    depend on the device count. "data-parallel": keras.distribution.DataParallel over
    all JAX devices (batch split, global BatchNorm statistics); "multi-process" the same
    over the devices of every process (after `start_processes`). "auto" picks one of
    them when the backend sees several accelerators, else "none".
    """
    backend = keras.backend.backend()
    if kind == "auto":
        if backend == "tensorflow":
            import tensorflow as tf

            kind = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
        elif backend == "jax":
            import jax

            kind = "data-parallel" if len([d for d in jax.devices() if d.platform != "cpu"]) > 1 else "none"
        else:
            kind = "none"
    if kind == "none":
        return contextlib.nullcontext(), 1, kind
    if kind == "mirrored":
        if backend != "tensorflow":
            raise ValueError(f"--distribute mirrored needs the TensorFlow backend (KERAS_BACKEND is {backend})")
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy.scope(), strategy.num_replicas_in_sync, kind
    if kind in ("data-parallel", "multi-process"):
        if backend != "jax":
            raise ValueError(f"--distribute {kind} needs the JAX backend (KERAS_BACKEND is {backend})")
        devices = keras.distribution.list_devices()  # every process's, after start_processes
        # Several processes: each feeds its own shard (data.train_pipeline), not Keras' auto-shard,
        # which would have every process decode and augment the whole set.
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=kind != "multi-process"))
        return contextlib.nullcontext(), len(devices), kind
    raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")


# --------------------------------------------------------------------------------------
# Models


def training_copy(source: keras.Model, num_classes: Optional[int] = None, image_size: Optional[int] = None,
                  sync_batch_norm: bool = False, preprocessing: Optional[Preprocessing] = None) -> keras.Model:
    """A ConvMixer like `source`, built under the current dtype policy and device scope,
    with its weights copied (by layer name).

    The head is new when `num_classes` differs from source's; under a mixed policy it
    computes in float32. The result always takes raw 0-255 RGB: a source without a
    preprocessing layer gets one with `preprocessing`'s mean and std.
    """
    arch = config_from_model(source)
    preprocessing = preprocessing or contract.info_of(source).preprocessing
    norm = contract.preprocessing_mean_std(source) or dict(mean=preprocessing.mean, std=preprocessing.std)
    num_classes = num_classes or arch.num_classes
    size = image_size or source.input_shape[1]
    model = ConvMixer(**dict(arch.to_dict(), num_classes=num_classes), input_shape=(size, size, 3),
                      include_preprocessing=True, name=source.name, **norm)
    if keras.config.dtype_policy().name != "float32" or sync_batch_norm:
        model = _retyped(model, sync_batch_norm)
    layers = contract.layers_by_name(source)
    for layer in model.layers:
        old = layers.get(layer.name)
        if old is None or not layer.weights:
            continue
        if layer.name == contract.HEAD and num_classes != arch.num_classes:
            continue  # a new head, freshly initialised
        layer.set_weights(old.get_weights())
    info = contract.ModelInfo(arch.replace(num_classes=num_classes), dataclasses.replace(preprocessing, **norm))
    return contract.attach(model, info)


def _retyped(model, sync_batch_norm):
    # Mixed precision keeps the logits float32 (softmax and loss in full precision);
    # synchronised BatchNorm exists as a constructor flag only, hence the clone.
    def clone(layer):
        config = layer.get_config()
        if layer.name == contract.HEAD and keras.config.dtype_policy().name != "float32":
            config["dtype"] = "float32"
        if sync_batch_norm and isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def float32_copy(model: keras.Model) -> keras.Model:
    """The trained network as a plain float32 ConvMixer (stock layers, exportable)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        arch = config_from_model(model)
        plain = ConvMixer(**arch.to_dict(), input_shape=model.input_shape[1:], include_preprocessing=True,
                          name=model.name, **contract.preprocessing_mean_std(model))
        layers = contract.layers_by_name(model)
        for layer in plain.layers:
            if layer.weights:
                layer.set_weights([np.asarray(w, np.float32) for w in layers[layer.name].get_weights()])
        return contract.attach(plain, contract.info_of(model))
    finally:
        keras.config.set_dtype_policy(previous)


def starting_model(config: TrainConfig):
    """(model to copy from, its Preprocessing) for `config`: the init file or a fresh variant."""
    if config.init is not None:
        model = contract.load_model(config.init, role="--init")
        return model, contract.info_of(model).preprocessing
    variant = get_variant(config.variant)
    size = variant.preprocessing.input_size
    model = ConvMixer(**variant.config.to_dict(), input_shape=(size, size, 3), include_preprocessing=True,
                      mean=variant.preprocessing.mean, std=variant.preprocessing.std, name=config.variant)
    return model, variant.preprocessing


def freeze_backbone(model: keras.Model):
    for layer in model.layers:
        if layer.name != contract.HEAD:
            layer.trainable = False


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int):
    """AdamW, the learning-rate schedule, label-smoothed cross-entropy on logits, top-1/top-5."""
    num_classes = model.output_shape[-1]
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=make_optimizer(config, config.epochs * steps_per_epoch, steps_per_epoch),
        # Weighted mean: the padding that evens out several processes' validation shards has
        # weight 0 (data.sharded_eval_pipeline); without weights it is the plain mean.
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing,
                                                  reduction="mean_with_sample_weight"),
        weighted_metrics=metrics,  # weighted: the padding's weight 0 keeps it out of the accuracies
        jit_compile=config.jit_compile,
    )


# --------------------------------------------------------------------------------------
# Callbacks


class StopOnNaN(keras.callbacks.Callback):
    """Aborts at the first non-finite loss, before the epoch ends, so no checkpoint or
    backup ever holds the diverged weights."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            checkpoint = os.path.join(self.output, "checkpoint.weights.h5")
            kept = (f"the weights of the last finished epoch are in {checkpoint}" if os.path.exists(checkpoint)
                    else "no epoch finished")
            raise TrainingError(
                f"loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}: training stopped "
                f"(lower --lr, keep --clip-norm, or use --precision fp32); {kept}")


@contextlib.contextmanager
def _one_process_alone():
    """Runs a block as this process's own business: Keras saving creates throwaway objects
    whose variables, under a multi-process distribution, every process would have to
    create together (a collective), which one process saving alone never does."""
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


class _SavesAlone:
    """A saving callback whose saves are this process's own business (see above)."""

    def _save_model(self, *args, **kwargs):
        with _one_process_alone():
            return super()._save_model(*args, **kwargs)


class LocalModelCheckpoint(_SavesAlone, keras.callbacks.ModelCheckpoint):
    pass


class LocalBackupAndRestore(_SavesAlone, keras.callbacks.BackupAndRestore):
    pass


class SameEpochEverywhere(keras.callbacks.Callback):
    """After BackupAndRestore, checks that every process resumes at the same epoch (a kill
    that lands between two processes' backups would leave them one epoch apart)."""

    def __init__(self, shard: Shard):
        super().__init__()
        self.shard = shard

    def on_train_begin(self, logs=None):
        from jax.experimental import multihost_utils

        epoch = np.asarray([self.model._initial_epoch or 0], np.int32)
        epochs = np.asarray(multihost_utils.process_allgather(epoch)).reshape(-1).tolist()
        if len(set(epochs)) > 1:
            raise TrainingError(f"the processes' backups are at different epochs ({epochs}): the run cannot resume "
                                "in step; start over with --force")


class Progress(keras.callbacks.Callback):
    """Counts trained images and time (throughput for metrics.json) and reports epochs
    to `log` when Keras' own progress bar is off."""

    def __init__(self, batch_size, log, verbose):
        super().__init__()
        self.batch_size, self.log, self.verbose = batch_size, log, verbose
        self.images, self.seconds, self.epochs, self._start = 0, 0.0, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0

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


# --------------------------------------------------------------------------------------
# The run


# What a run folder holds; --force replaces only a folder of these (config.json marks it).
RUN_FILES = ("config.json", "backup", "checkpoint.weights.h5", "history.csv", "logs", "model.keras", "metrics.json")


def run_folder_kind() -> common.OutputKind:
    return common.OutputKind("convmixer_tf.train", "config.json", lambda: RUN_FILES,
                             lambda settings: isinstance(settings, dict) and {"epochs", "batch_size"} <= set(settings))


def _prepare_output(config: TrainConfig, log, shard: Shard = Shard()) -> bool:
    """Creates or checks the output folder; True when an interrupted run is resumed.

    --force starts over only in a run folder of ours that holds none of the run's inputs;
    anything else is refused (exit 2) with the name of what would be lost. Every process
    of a run checks the same folder (it must reach it: one host, or a shared file
    system) before process 0 writes anything.
    """
    out = os.path.abspath(config.output)
    settings = {k: v for k, v in config.to_dict().items() if k not in TrainConfig.PER_PROCESS}
    fresh = config.force and os.path.lexists(out)
    if fresh:
        inputs = [config.init, config.data_dir, config.tfds_data_dir, config.manual_dir]
        common.check_replaceable(out, run_folder_kind(), True, inputs)
    resumed = False if fresh else _existing_run(out, settings, log)
    sync(shard, "output checked")
    if shard.index == 0:
        if fresh:
            shutil.rmtree(out)
        if not os.path.exists(os.path.join(out, "config.json")):
            os.makedirs(out, exist_ok=True)
            common.write_json_atomic(os.path.join(out, "config.json"), settings)
    sync(shard, "output ready")
    return resumed


def _existing_run(out, settings, log) -> bool:
    """For an output that exists: True to resume it, or a ValueError saying why not."""
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
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output {out} exists and is not a training run; use another --output")
    return False


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
    initial, preprocessing = starting_model(config)
    size = config.image_size or initial.input_shape[1] or preprocessing.input_size
    scope, replicas, kind = distribution(config.distribute)
    steps = _steps_per_epoch(config, source, replicas)
    log(f"{source.name}: {source.train_size} training / {source.val_size} validation images, "
        f"{source.num_classes} classes; {size} px, batch {config.batch_size}, {steps} steps per epoch, "
        f"{replicas} device(s) in {shard.count} process(es) ({kind}), {config.precision}")
    # Only now, with the data, the model and the devices checked: a bad argument leaves no folder.
    resumed = _prepare_output(config, log, shard)
    model = _training_model(config, initial, source, size, scope, kind, preprocessing, steps)
    del initial
    eval_preprocessing = _eval_preprocessing(preprocessing, size, source)
    progress = Progress(config.batch_size, log, config.verbose)
    started = time.perf_counter()
    with _losing_a_process_is_fatal(shard):
        model.fit(_train_data(config, source, size, shard), epochs=config.epochs, steps_per_epoch=steps,
                  validation_data=_val_data(config, source, eval_preprocessing, shard, kind),
                  callbacks=_callbacks(config, progress, log, shard),
                  verbose=config.verbose if shard.index == 0 else 0, shuffle=False)
    metrics = _metrics(config, model, source, progress, started, resumed, replicas, kind, size, shard)
    sync(shard, "trained")
    if shard.count > 1:
        keras.distribution.set_distribution(None)  # the copy below is one process's, not the run's
    if shard.index == 0:  # one writer of the results
        final = float32_copy(model)
        info = contract.info_of(final).replace(preprocessing=eval_preprocessing, class_names=tuple(source.class_names))
        contract.save_model(final, os.path.join(config.output, "model.keras"), info)
        shutil.rmtree(os.path.join(config.output, "backup"), ignore_errors=True)
        write_json_atomic(os.path.join(config.output, "metrics.json"), metrics)
    sync(shard, "saved")
    return metrics


@contextlib.contextmanager
def _losing_a_process_is_fatal(shard: Shard):
    """A collective that fails in a multi-process run (another process died or stopped
    answering) becomes a TrainingError that says so."""
    try:
        yield
    except (TrainingError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - the runtime's errors come as many types
        if shard.count == 1:
            raise
        raise TrainingError(f"process {shard.index} of {shard.count} lost the run ({common.one_line(err)[:300]}); "
                            "another process stopped. Start every process again with the same command to resume "
                            "from the last finished epoch") from None


def _steps_per_epoch(config: TrainConfig, source: DataSource, replicas: int) -> int:
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} does not split over {replicas} devices")
    steps = source.train_size // config.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({source.train_size})")
    return min(steps, config.steps_per_epoch or steps)


def _eval_preprocessing(preprocessing: Preprocessing, size: int, source: DataSource) -> Preprocessing:
    """timm's eval transform at the training size; no crop for a set of images already that size."""
    pre = dataclasses.replace(preprocessing, input_size=size)
    if source.image_shape is not None and tuple(source.image_shape) == (size, size):
        pre = dataclasses.replace(pre, crop_pct=1.0)
    return pre


def _training_model(config, initial, source, size, scope, kind, preprocessing, steps):
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[config.precision])
    try:
        with scope:
            model = training_copy(initial, source.num_classes, size, sync_batch_norm=kind == "mirrored",
                                  preprocessing=preprocessing)
            if config.freeze_backbone:
                freeze_backbone(model)
            compile_model(model, config, steps)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return model


def _train_data(config: TrainConfig, source: DataSource, size: int, shard: Shard = Shard()):
    augmenter = Augmenter(config.augment, size, source.num_classes, seed=config.seed + shard.index)
    return train_pipeline(source, augmenter, config.batch_size, seed=config.seed, shard=shard).repeat()


def _val_data(config: TrainConfig, source: DataSource, preprocessing: Preprocessing, shard: Shard = Shard(),
              kind: str = "none"):
    if source.val is None or not source.val_size:
        return None
    size = preprocessing.input_size
    cache = source.image_shape is not None and source.val_size * size * size * 3 < 1 << 30
    if kind in ("data-parallel", "multi-process"):  # every batch whole: keras.distribution splits it over devices
        val_ds = sharded_eval_pipeline(source.val, source.val_size, preprocessing, config.batch_size,
                                       source.num_classes, shard, cache=cache)
    else:
        val_ds = eval_pipeline(source.val, preprocessing, config.batch_size, num_classes=source.num_classes,
                               cache=cache)
    return val_ds.take(config.val_steps) if config.val_steps else val_ds


def _callbacks(config: TrainConfig, progress, log, shard: Shard = Shard()) -> list:
    out = config.output
    backup = os.path.join(out, "backup", f"process{shard.index}") if shard.count > 1 else os.path.join(out, "backup")
    callbacks = [StopOnNaN(out), progress]
    if shard.index == 0:  # what the run writes once
        # The history row first, then the backup: a kill between them re-trains that
        # epoch and read_history keeps its last row, so no finished epoch is lost.
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True))
    callbacks.append(LocalBackupAndRestore(backup, delete_checkpoint=False))  # every process its own
    if shard.index == 0:
        callbacks.append(LocalModelCheckpoint(os.path.join(out, "checkpoint.weights.h5"), save_weights_only=True))
    if shard.count > 1:
        callbacks.append(SameEpochEverywhere(shard))
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        log("TensorBoard is not installed (pip install tensorboard): no logs/ written")
    elif config.tensorboard and shard.index == 0:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "logs")))
    return callbacks


def _metrics(config, model, source, progress, started, resumed, replicas, kind, size, shard: Shard) -> dict:
    history = read_history(os.path.join(config.output, "history.csv"))
    return {
        "epochs": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "train_images_per_second": round(progress.images / progress.seconds, 2) if progress.seconds else None,
        "wall_seconds_this_session": round(time.perf_counter() - started, 2),
        "resumed": resumed,
        "epochs_this_session": progress.epochs,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "devices": replicas,
        "processes": shard.count,
        "distribution": kind,
        "backend": keras.backend.backend(),
        "dataset": source.name,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "skipped_images": [{"file": path, "reason": reason} for path, reason in source.skipped],
        "image_size": size,
        "model": os.path.join(config.output, "model.keras"),
    }
