"""Everything one training run needs, as one dataclass whose defaults are the paper's
CIFAR-10 recipe. The train command's options are generated from its fields.

Nothing here imports Keras: the command line is built (and --help answered) without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Optional

from convmixer_tf.augment import GROUP as AUGMENT_GROUP
from convmixer_tf.augment import AugmentConfig
from convmixer_tf.common import option
from convmixer_tf.config import get_variant, list_variants

PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
SCHEDULES = ("onecycle", "cosine", "constant")
DISTRIBUTIONS = ("auto", "none", "mirrored", "data-parallel", "multi-process")
# Option groups of the train command, in --help order.
DATA, RUN, DEVICES = "model and data", "schedule and optimiser", "devices and output"
OPTION_GROUPS = (DATA, RUN, AUGMENT_GROUP, DEVICES)


def _jit(text):
    try:
        return {"auto": "auto", "on": True, "off": False}[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs. Defaults: the paper's CIFAR-10 recipe
    (ConvMixer-256/8, batch 512, AdamW lr 0.05 wd 0.005, one-cycle, clip 1.0, 25 epochs).

    Args:
        variant: architecture from the variant table (ignored with `init`).
        init: a `.keras` ConvMixer to start from (e.g. a converted checkpoint); its head
            is replaced when the dataset has another number of classes.
        dataset / data_dir / tfds_data_dir / manual_dir / offline / train_split /
            val_split / val_fraction / strict_images: the data, see
            `convmixer_tf.data.open_dataset`.
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

    variant: str = option("convmixer_256_8", "architecture to train from scratch: " + ", ".join(list_variants()),
                          choices=list_variants(), metavar="NAME", group=DATA)
    init: Optional[str] = option(None, "start from this model (e.g. a converted checkpoint); a new head when the "
                                 "class count differs", metavar="MODEL.keras", group=DATA)
    dataset: Optional[str] = option(None, "tensorflow-datasets name: cifar10, cifar100, imagenette, imagenet2012, ...",
                                    metavar="NAME", by_hand=True)
    data_dir: Optional[str] = option(None, "image folder: DIR/<class>/*, or DIR/train/<class>/* with DIR/val/<class>/*",
                                     metavar="DIR", by_hand=True)
    tfds_data_dir: Optional[str] = option(None, "where tfds keeps prepared datasets (offline copies)", metavar="DIR",
                                          group=DATA)
    manual_dir: Optional[str] = option(None, "tfds manual_dir (imagenet2012's tar files)", metavar="DIR", group=DATA)
    offline: bool = option(False, "never download; an unprepared dataset is an error", group=DATA)
    train_split: Optional[str] = option(None, "tfds split to train on (default train)", metavar="SPLIT", group=DATA)
    val_split: Optional[str] = option(None, "tfds split to validate on (default validation or test; 'none' skips)",
                                      metavar="SPLIT", group=DATA)
    val_fraction: float = option(0.1, "held-out share of a folder without val/", group=DATA)
    image_size: Optional[int] = option(None, "training resolution (default: the variant's)", group=DATA)
    strict_images: bool = option(False, "an image that does not decode is an error (default: it is left out, "
                                 "with a warning naming it, and counted in metrics.json)", group=DATA)
    epochs: int = option(25, "training epochs", group=RUN)
    batch_size: int = option(512, "global batch, split over devices", group=RUN)
    steps_per_epoch: Optional[int] = option(None, "cap on steps per epoch (quick runs)", group=RUN)
    val_steps: Optional[int] = option(None, "cap on validation batches", group=RUN)
    lr: float = option(0.05, "peak learning rate", group=RUN)
    weight_decay: float = option(0.005, "AdamW decoupled weight decay", group=RUN)
    schedule: str = option("onecycle", "learning rate over time", choices=SCHEDULES, group=RUN)
    warmup_epochs: float = option(0.0, "linear warmup of the cosine schedule", group=RUN)
    clip_norm: Optional[float] = option(1.0, "global gradient-norm clipping (0 turns it off)", type=float,
                                        to_field=lambda value: value or None, group=RUN)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", group=RUN)
    backbone_lr_mult: float = option(1.0, "learning-rate factor for all layers but the head", group=RUN)
    freeze_backbone: bool = option(False, "train the head only", group=RUN)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    precision: str = option("fp32", "mixed precision compute (the head and the saved model stay float32)",
                            choices=tuple(PRECISIONS), group=DEVICES)
    jit_compile: object = option("auto", "XLA; auto leaves it off on CPU, where it is slower", type=_jit,
                                 choices=("auto", True, False), metavar="auto|on|off", group=DEVICES)
    distribute: str = option("auto", "mirrored: tf.distribute over one host's devices (TensorFlow backend); "
                             "data-parallel: keras.distribution over one process's devices (JAX backend); "
                             "multi-process: keras.distribution over every device of several processes or "
                             "hosts (JAX backend, JAX's distributed runtime)", choices=DISTRIBUTIONS, group=DEVICES)
    coordinator: Optional[str] = option(None, "multi-process: process 0's HOST:PORT, which every process connects "
                                        "to (not needed under SLURM or Open MPI)", metavar="HOST:PORT", group=DEVICES)
    num_processes: Optional[int] = option(None, "multi-process: how many processes train together", group=DEVICES)
    process_id: Optional[int] = option(None, "multi-process: this process's index, 0 to N-1", group=DEVICES)
    heartbeat_timeout: int = option(60, "multi-process: seconds after which a process that stopped answering counts "
                                    "as dead, and the others stop with an error", group=DEVICES)
    seed: int = option(0, "seed of the data order, augmentation and new weights", group=DEVICES)
    output: str = option("runs/convmixer", "run folder (default runs/<variant or init>_<dataset>)", metavar="DIR",
                         by_hand=True)
    force: bool = option(False, "start over, deleting an earlier run in --output (never a folder of "
                         "anything else)", group=DEVICES)
    tensorboard: bool = option(True, "no TensorBoard logs", flag="--no-tensorboard", group=DEVICES)
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
        self._validate_processes()
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= label_smoothing < 1")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {self.clip_norm}")
        if not 0 < self.backbone_lr_mult <= 1e3:
            raise ValueError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}")

    def _validate_processes(self):
        given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and self.distribute != "multi-process":
            raise ValueError("--coordinator, --num-processes and --process-id go with --distribute multi-process")
        if any(given) and not all(given):
            raise ValueError("give all of --coordinator, --num-processes and --process-id, or none of them "
                             "(under SLURM or Open MPI JAX finds them itself)")
        if all(given) and not (self.num_processes >= 1 and 0 <= self.process_id < self.num_processes):
            raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.coordinator is not None and not re.fullmatch(r"[^\s:]+:\d+", self.coordinator):
            raise ValueError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.heartbeat_timeout < 1:
            raise ValueError(f"heartbeat_timeout must be >= 1 second, got {self.heartbeat_timeout}")

    # What may differ between the processes of one run, or between a run and its resumption.
    PER_PROCESS = ("coordinator", "process_id", "heartbeat_timeout", "force", "verbose", "output")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


