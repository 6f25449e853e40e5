"""Everything one training run needs, as one dataclass whose defaults are the paper's
CIFAR-10 recipe. Nothing here imports Keras."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from convmixer_tf.augment import AugmentConfig
from convmixer_tf.config import get_variant
from convmixer_tf.errors import BadInput

PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
SCHEDULES = ("onecycle", "cosine", "constant")
DISTRIBUTIONS = ("auto", "none", "mirrored", "data-parallel", "multi-process")


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
            optimiser (AdamW, global-norm clipping; None: none) and its learning rate.
        backbone_lr_mult: learning-rate factor for every layer but the head.
        freeze_backbone: train the head only (BatchNorm statistics frozen too).
        augment: see `AugmentConfig`.
        precision: "fp32", "bf16" or "fp16" (mixed; the head stays float32).
        jit_compile: "auto" (Keras decides: off on CPU), True or False.
        distribute: "auto", "none", "mirrored" (TensorFlow backend), "data-parallel" or
            "multi-process" (JAX backend, keras.distribution); coordinator,
            num_processes, process_id, heartbeat_timeout: the processes of the latter.
        seed: data order, augmentation and new weights.
        output: the run's folder; force=True starts it over (the earlier run stays
            until the new one has finished).
        tensorboard: write TensorBoard logs; verbose: Keras' progress (0, 1, 2).
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
    strict_images: bool = False
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
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    heartbeat_timeout: int = 60
    seed: int = 0
    output: str = "runs/convmixer"
    force: bool = False
    tensorboard: bool = True
    verbose: int = 1

    # What may differ between the processes of one run, or between a run and its resumption.
    PER_PROCESS = ("coordinator", "process_id", "heartbeat_timeout", "force", "verbose", "output")

    def settings(self) -> dict:
        """What the run is, as its folder's config.json stores it: every field but those that
        may differ between its processes or between it and its resumption (PER_PROCESS)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.PER_PROCESS}

    @classmethod
    def with_defaults(cls, stored: dict) -> dict:
        """`stored` settings (a run folder's config.json, perhaps written by an earlier version)
        with every field it lacks at its default, so a field added since does not stop an
        unfinished run from resuming."""
        defaults = cls().settings()
        completed = dict(defaults, **stored)
        if isinstance(stored.get("augment"), dict):
            completed["augment"] = dict(defaults["augment"], **stored["augment"])
        return completed

    def validate(self):
        if self.init is None:
            get_variant(self.variant)
        elif os.path.isdir(self.init):
            raise BadInput(f"--init {self.init} is a folder, not a .keras file")
        elif not os.path.isfile(self.init):
            raise BadInput(f"--init model not found: {self.init}")
        for field in ("epochs", "batch_size", "steps_per_epoch", "val_steps", "image_size"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise BadInput(f"{field} must be a positive integer, got {value}")
        for field, allowed in (
            ("precision", PRECISIONS),
            ("schedule", SCHEDULES),
            ("distribute", DISTRIBUTIONS),
        ):
            if getattr(self, field) not in allowed:
                raise BadInput(
                    f"{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}"
                )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise BadInput("need lr > 0, weight_decay >= 0 and 0 <= label_smoothing < 1")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise BadInput(f"clip_norm must be > 0 (or None for no clipping), got {self.clip_norm}")
        if not 0 < self.backbone_lr_mult <= 1e3:
            raise BadInput(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}")
        self._validate_processes()

    def _validate_processes(self):
        given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and self.distribute != "multi-process":
            raise BadInput(
                "--coordinator, --num-processes and --process-id go with --distribute multi-process"
            )
        if any(given) and not all(given):
            raise BadInput(
                "give all of --coordinator, --num-processes and --process-id, or none of them "
                "(under SLURM or Open MPI JAX finds them itself)"
            )
        if all(given) and not (
            self.num_processes >= 1 and 0 <= self.process_id < self.num_processes
        ):
            raise BadInput(
                f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}"
            )
        if self.coordinator is not None and not re.fullmatch(r"[^\s:]+:\d+", self.coordinator):
            raise BadInput(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.heartbeat_timeout < 1:
            raise BadInput(f"heartbeat_timeout must be >= 1 second, got {self.heartbeat_timeout}")
