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
import importlib.util
import json
import math
import os
import shutil
import time
from typing import Callable, Optional, Tuple

import keras
import numpy as np

from convmixer_tf.augment import AugmentConfig, Augmenter
from convmixer_tf.config import VARIANTS, Preprocessing, get_variant
from convmixer_tf.data import DataSource, eval_pipeline, open_dataset, train_pipeline
from convmixer_tf.model import ConvMixer, _layer_mean_std, config_from_model

PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
SCHEDULES = ("onecycle", "cosine", "constant")
DISTRIBUTIONS = ("auto", "none", "mirrored", "data-parallel")


class TrainingError(RuntimeError):
    """The run started but cannot finish (diverged, ...): exit status 1."""


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. Defaults: the paper's CIFAR-10 recipe
    (ConvMixer-256/8, batch 512, AdamW lr 0.05 wd 0.005, one-cycle, clip 1.0, 25 epochs).

    Args:
        variant: architecture from the variant table (ignored with `init`).
        init: a `.keras` ConvMixer to start from (e.g. a converted checkpoint); its head
            is replaced when the dataset has another number of classes.
        dataset / data_dir / tfds_data_dir / manual_dir / offline / train_split /
            val_split / val_fraction: the data, see `convmixer_tf.data.open_dataset`.
        image_size: training resolution; default the variant's (or the init model's).
        epochs, batch_size: global batch size, split over devices.
        steps_per_epoch, val_steps: cap the steps (quick runs); default whole epochs.
        lr, weight_decay, schedule, warmup_epochs, clip_norm, label_smoothing: the
            optimiser (AdamW, global-norm clipping) and its learning rate over time.
        backbone_lr_mult: learning-rate factor for every layer but the head.
        freeze_backbone: train the head only (BatchNorm statistics frozen too).
        augment: see `AugmentConfig`.
        precision: "fp32", "bf16" or "fp16" (mixed; the head stays float32).
        jit_compile: "auto" (Keras decides: off on CPU), True or False.
        distribute: "auto", "none", "mirrored" (TensorFlow backend) or "data-parallel"
            (JAX backend, keras.distribution).
        output: the run's folder; force=True starts it over.
    """

    variant: str = "convmixer_256_8"
    init: Optional[str] = None
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    tfds_data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    offline: bool = False
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    val_fraction: float = 0.1
    image_size: Optional[int] = None
    epochs: int = 25
    batch_size: int = 512
    steps_per_epoch: Optional[int] = None
    val_steps: Optional[int] = None
    lr: float = 0.05
    weight_decay: float = 0.005
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    clip_norm: Optional[float] = 1.0
    label_smoothing: float = 0.0
    backbone_lr_mult: float = 1.0
    freeze_backbone: bool = False
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    precision: str = "fp32"
    jit_compile: object = "auto"
    distribute: str = "auto"
    seed: int = 0
    output: str = "runs/convmixer"
    force: bool = False
    tensorboard: bool = True
    verbose: int = 1

    def validate(self):
        if self.init is None:
            get_variant(self.variant)
        elif not os.path.isfile(self.init):
            raise ValueError(f"--init model not found: {self.init}")
        for field in ("epochs", "batch_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)}")
        for field in ("steps_per_epoch", "val_steps", "image_size"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.distribute not in DISTRIBUTIONS:
            raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribute!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= label_smoothing < 1")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {self.clip_norm}")
        if not 0 < self.backbone_lr_mult <= 1e3:
            raise ValueError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def distribution(kind: str = "auto"):
    """(context manager to build and compile in, number of replicas) for `kind`.

    "mirrored": tf.distribute.MirroredStrategy over the GPUs, or the (logical) CPUs
    when there is no GPU; BatchNorm is synchronised over replicas so the numbers do not
    depend on the device count. "data-parallel": keras.distribution.DataParallel over
    all JAX devices (batch split, global BatchNorm statistics). "auto" picks one of
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
    if kind == "data-parallel":
        if backend != "jax":
            raise ValueError(f"--distribute data-parallel needs the JAX backend (KERAS_BACKEND is {backend})")
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
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
    layers = {layer.name: layer for layer in source.layers}
    if "preprocessing" in layers:
        norm = _layer_mean_std(layers["preprocessing"])
    else:
        preprocessing = preprocessing or Preprocessing()
        norm = dict(mean=preprocessing.mean, std=preprocessing.std)
    num_classes = num_classes or arch.num_classes
    size = image_size or source.input_shape[1]
    model = ConvMixer(**dict(arch.to_dict(), num_classes=num_classes), input_shape=(size, size, 3),
                      include_preprocessing=True, name=source.name, **norm)
    if keras.config.dtype_policy().name != "float32" or sync_batch_norm:
        model = _retyped(model, sync_batch_norm)
    for layer in model.layers:
        old = layers.get(layer.name)
        if old is None or not layer.weights:
            continue
        if layer.name == "head" and num_classes != arch.num_classes:
            continue  # a new head, freshly initialised
        layer.set_weights(old.get_weights())
    return model


def _retyped(model, sync_batch_norm):
    # Mixed precision keeps the logits float32 (softmax and loss in full precision);
    # synchronised BatchNorm exists as a constructor flag only, hence the clone.
    def clone(layer):
        config = layer.get_config()
        if layer.name == "head" and keras.config.dtype_policy().name != "float32":
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
        layers = {layer.name: layer for layer in model.layers}
        norm = _layer_mean_std(layers["preprocessing"])
        plain = ConvMixer(**arch.to_dict(), input_shape=model.input_shape[1:], include_preprocessing=True,
                          name=model.name, **norm)
        for layer in plain.layers:
            if layer.weights:
                layer.set_weights([np.asarray(w, np.float32) for w in layers[layer.name].get_weights()])
        return plain
    finally:
        keras.config.set_dtype_policy(previous)


def starting_model(config: TrainConfig):
    """(model to copy from, its Preprocessing) for `config`: the init file or a fresh variant."""
    if config.init is not None:
        try:
            model = keras.models.load_model(config.init, compile=False)
        except Exception as err:  # noqa: BLE001 - any reason the file does not load
            raise ValueError(f"cannot load --init {config.init}: {str(err).splitlines()[0]}") from None
        config_from_model(model)  # a ConvMixer, or a ValueError naming the problem
        # A converted checkpoint is named after the released variant it matches: its
        # mean/std then, else ImageNet's (used only when the model has no preprocessing layer).
        known = VARIANTS.get(model.name)
        return model, known.preprocessing if known else Preprocessing()
    variant = get_variant(config.variant)
    size = variant.preprocessing.input_size
    model = ConvMixer(**variant.config.to_dict(), input_shape=(size, size, 3), include_preprocessing=True,
                      mean=variant.preprocessing.mean, std=variant.preprocessing.std, name=config.variant)
    return model, variant.preprocessing


def freeze_backbone(model: keras.Model):
    for layer in model.layers:
        if layer.name != "head":
            layer.trainable = False


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int):
    """AdamW, the learning-rate schedule, label-smoothed cross-entropy on logits, top-1/top-5."""
    num_classes = model.output_shape[-1]
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=make_optimizer(config, config.epochs * steps_per_epoch, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=metrics,
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


def _prepare_output(config: TrainConfig, log) -> bool:
    """Creates or checks the output folder; True when an interrupted run is resumed."""
    out = config.output
    settings = {k: v for k, v in config.to_dict().items() if k not in ("force", "verbose", "output")}
    settings_path = os.path.join(out, "config.json")
    if config.force and os.path.exists(out):
        shutil.rmtree(out)
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise ValueError(f"{out} already holds a finished run; use --force to start over or another --output")
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
        raise ValueError(f"output {out} exists and is not a training run; use --force or another --output")
    os.makedirs(out, exist_ok=True)
    _write_json(settings_path, settings)
    return False


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


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
    source = source or open_dataset(
        config.dataset, config.data_dir, tfds_data_dir=config.tfds_data_dir, manual_dir=config.manual_dir,
        offline=config.offline, train_split=config.train_split, val_split=config.val_split,
        val_fraction=config.val_fraction, seed=config.seed)
    keras.utils.set_random_seed(config.seed)

    initial, preprocessing = starting_model(config)
    size = config.image_size or initial.input_shape[1] or preprocessing.input_size
    eval_preprocessing = dataclasses.replace(preprocessing, input_size=size)
    if source.image_shape is not None and tuple(source.image_shape) == (size, size):
        eval_preprocessing = dataclasses.replace(eval_preprocessing, crop_pct=1.0)

    scope, replicas, kind = distribution(config.distribute)
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} does not split over {replicas} devices")
    steps = source.train_size // config.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set ({source.train_size})")
    steps = min(steps, config.steps_per_epoch or steps)
    log(f"{source.name}: {source.train_size} training / {source.val_size} validation images, "
        f"{source.num_classes} classes; {size} px, batch {config.batch_size}, {steps} steps per epoch, "
        f"{replicas} device(s) ({kind}), {config.precision}")
    # Only now, with the data, the model and the devices checked: a bad argument leaves no folder.
    resumed = _prepare_output(config, log)

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
    del initial

    augmenter = Augmenter(config.augment, size, source.num_classes, seed=config.seed)
    train_ds = train_pipeline(source, augmenter, config.batch_size, seed=config.seed).repeat()
    val_ds = None
    if source.val is not None and source.val_size:
        val_ds = eval_pipeline(source.val, eval_preprocessing, config.batch_size, num_classes=source.num_classes,
                               cache=source.image_shape is not None and source.val_size * size * size * 3 < 1 << 30)
        if config.val_steps:
            val_ds = val_ds.take(config.val_steps)

    out = config.output
    nan_guard = StopOnNaN(out)
    progress = Progress(config.batch_size, log, config.verbose)
    callbacks = [
        nan_guard,
        progress,
        # The history row first, then the backup: a kill between them re-trains that
        # epoch and read_history keeps its last row, so no finished epoch is lost.
        keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(os.path.join(out, "checkpoint.weights.h5"), save_weights_only=True),
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup"), delete_checkpoint=False),
    ]
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        log("TensorBoard is not installed (pip install tensorboard): no logs/ written")
    elif config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "logs")))

    started = time.perf_counter()
    model.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps, validation_data=val_ds,
              callbacks=callbacks, verbose=config.verbose, shuffle=False)

    final = float32_copy(model)
    _save_model_atomic(final, os.path.join(out, "model.keras"))
    history = read_history(os.path.join(out, "history.csv"))
    metrics = {
        "epochs": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "train_images_per_second": round(progress.images / progress.seconds, 2) if progress.seconds else None,
        "wall_seconds_this_session": round(time.perf_counter() - started, 2),
        "resumed": resumed,
        "epochs_this_session": progress.epochs,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "devices": replicas,
        "distribution": kind,
        "backend": keras.backend.backend(),
        "dataset": source.name,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "image_size": size,
        "model": os.path.join(out, "model.keras"),
    }
    shutil.rmtree(os.path.join(out, "backup"), ignore_errors=True)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _save_model_atomic(model, path):
    tmp = path[: -len(".keras")] + ".partial.keras"
    model.save(tmp)
    os.replace(tmp, path)
