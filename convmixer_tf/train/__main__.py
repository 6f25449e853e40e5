"""python -m convmixer_tf.train: train or fine-tune a ConvMixer (the job: convmixer_tf.train).

    python -m convmixer_tf.train --variant convmixer_256_8 --dataset cifar10 --output runs/c10
    python -m convmixer_tf.train --init converted/model.keras --data-dir flowers/ \\
        --image-size 224 --epochs 10 --batch-size 64 --lr 1e-3 --backbone-lr-mult 0.1 \\
        --schedule cosine --warmup-epochs 1 --label-smoothing 0.1

Exit status: 0 done, 1 the run failed (loss not finite), 2 bad arguments or data,
3 internal error, 130/143 interrupted. Run the same command again after a kill to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from convmixer_tf import cli, errors
from convmixer_tf.augment import AugmentConfig
from convmixer_tf.config import MAX_INPUT_SIZE, list_variants
from convmixer_tf.train.recipe import DISTRIBUTIONS, PRECISIONS, SCHEDULES, TrainConfig

DEFAULTS = TrainConfig()
AUGMENT = AugmentConfig()
JIT = {"auto": "auto", "on": True, "off": False}  # --jit-compile -> TrainConfig.jit_compile


# The options, group by group as --help shows them: (flag, help, argparse's settings). Each
# sets the TrainConfig (or AugmentConfig) field of its dest, and that field's value is its
# default (`_add`).

# What to train: a variant from scratch, or a model to start from.
MODEL_OPTIONS = (
    (
        "--variant",
        "architecture to train from scratch: " + ", ".join(list_variants()),
        dict(choices=list_variants(), metavar="NAME"),
    ),
    (
        "--init",
        "start from this model (e.g. a converted checkpoint); a new head when the class count differs",
        dict(metavar="MODEL.keras"),
    ),
    (
        "--image-size",
        "training resolution (default: the variant's)",
        dict(type=cli.positive(most=MAX_INPUT_SIZE), metavar="PIXELS"),
    ),
)

# Where the images come from: exactly one of these two, then the rest.
SOURCES = (
    (
        "--dataset",
        "tensorflow-datasets name: cifar10, cifar100, imagenette, imagenet2012, ...",
        dict(metavar="NAME"),
    ),
    (
        "--data-dir",
        "image folder: DIR/<class>/*, or DIR/train/<class>/* with DIR/val/<class>/*",
        dict(metavar="DIR"),
    ),
)

DATA_OPTIONS = (
    ("--tfds-data-dir", "where tfds keeps prepared datasets (offline copies)", dict(metavar="DIR")),
    ("--manual-dir", "tfds manual_dir (imagenet2012's tar files)", dict(metavar="DIR")),
    ("--offline", "never download; an unprepared dataset is an error", dict(action="store_true")),
    ("--train-split", "tfds split to train on (default train)", dict(metavar="SPLIT")),
    (
        "--val-split",
        "tfds split to validate on (default validation or test; 'none' skips)",
        dict(metavar="SPLIT"),
    ),
    ("--val-fraction", "held-out share of a folder without val/", dict(type=float)),
    (
        "--strict-images",
        "an image that does not decode is an error (default: it is left out, with a warning naming "
        "it, and counted in metrics.json)",
        dict(action="store_true"),
    ),
)

# How long, in what batches, at what learning rate.
SCHEDULE_OPTIONS = (
    ("--epochs", "training epochs", dict(type=int)),
    ("--batch-size", "global batch, split over devices", dict(type=int)),
    ("--steps-per-epoch", "cap on steps per epoch (quick runs)", dict(type=int)),
    ("--val-steps", "cap on validation batches", dict(type=int)),
    ("--lr", "peak learning rate", dict(type=float)),
    ("--schedule", "learning rate over time", dict(choices=SCHEDULES)),
    ("--warmup-epochs", "linear warmup of the cosine schedule", dict(type=float)),
)

# AdamW and what is trained.
OPTIMISER_OPTIONS = (
    ("--weight-decay", "AdamW decoupled weight decay", dict(type=float)),
    ("--clip-norm", "global gradient-norm clipping (0 turns it off)", dict(type=float)),
    ("--label-smoothing", "label smoothing of the cross-entropy", dict(type=float)),
    ("--backbone-lr-mult", "learning-rate factor for all layers but the head", dict(type=float)),
    ("--freeze-backbone", "train the head only", dict(action="store_true")),
)

# RandomResizedCrop, flips and RandAugment.
AUGMENT_OPTIONS = (
    ("--scale", "RandomResizedCrop area range", dict(type=cli.floats(2), metavar="MIN,MAX")),
    ("--ratio", "RandomResizedCrop aspect ratios", dict(type=cli.floats(2), metavar="MIN,MAX")),
    ("--no-flip", "no random horizontal flips", dict(dest="hflip", action="store_false")),
    (
        "--ra-n",
        "RandAugment ops per image (0: off)",
        dict(dest="randaugment_n", type=int, metavar="N"),
    ),
    ("--ra-m", "RandAugment magnitude, 0-30", dict(dest="randaugment_m", type=int, metavar="M")),
)

# Colour jitter, random erasing, mixup and cutmix.
MIXING_OPTIONS = (
    ("--jitter", "colour jitter strength", dict(type=float)),
    ("--reprob", "random erasing probability", dict(dest="erasing", type=float, metavar="P")),
    ("--mixup", "mixup alpha (0: off)", dict(type=float)),
    ("--cutmix", "cutmix alpha (0: off)", dict(type=float)),
)

# Precision, XLA and how the batch is split over devices.
DEVICE_OPTIONS = (
    (
        "--precision",
        "mixed precision compute (the head and the saved model stay float32)",
        dict(choices=tuple(PRECISIONS)),
    ),
    (
        "--jit-compile",
        "XLA; auto leaves it off on CPU, where it is slower",
        dict(choices=tuple(JIT), metavar="auto|on|off"),
    ),
    (
        "--distribute",
        "mirrored: tf.distribute over one host's devices (TensorFlow backend); data-parallel: "
        "keras.distribution over one process's devices (JAX backend); multi-process: "
        "keras.distribution over every device of several processes or hosts (JAX backend, JAX's "
        "distributed runtime)",
        dict(choices=DISTRIBUTIONS),
    ),
    ("--seed", "seed of the data order, augmentation and new weights", dict(type=int)),
)

# Several processes (--distribute multi-process).
PROCESS_OPTIONS = (
    (
        "--coordinator",
        "multi-process: process 0's HOST:PORT, which every process connects to (not needed under "
        "SLURM or Open MPI)",
        dict(metavar="HOST:PORT"),
    ),
    ("--num-processes", "multi-process: how many processes train together", dict(type=int)),
    ("--process-id", "multi-process: this process's index, 0 to N-1", dict(type=int)),
    (
        "--heartbeat-timeout",
        "multi-process: seconds after which a process that stopped answering counts as dead, and "
        "the others stop with an error",
        dict(type=int),
    ),
)

# The run folder (--output is declared apart: its default is made from names).
OUTPUT_OPTIONS = (
    (
        "--force",
        "start over in --output, replacing an earlier run there once the new one has finished "
        "(never a folder of anything else)",
        dict(action="store_true"),
    ),
    ("--no-tensorboard", "no TensorBoard logs", dict(dest="tensorboard", action="store_false")),
)


def build_parser():
    p = cli.ArgumentParser(
        prog="python -m convmixer_tf.train",
        description="Train or fine-tune a ConvMixer on a tensorflow-datasets set or an image folder. "
        "Defaults are the paper's CIFAR-10 recipe (ConvMixer-256/8, 25 epochs, batch 512, "
        "AdamW lr 0.05 wd 0.005, one-cycle, RandAugment 2/12). The output folder gets "
        "model.keras (float32, stock layers, class names inside), metrics.json, history.csv, "
        "TensorBoard logs and a backup: the same command resumes a killed run.",
    )
    _add(p.add_argument_group("model"), MODEL_OPTIONS)
    data = p.add_argument_group("data")
    _add(data.add_mutually_exclusive_group(required=True), SOURCES)
    _add(data, DATA_OPTIONS)
    _add(p.add_argument_group("schedule"), SCHEDULE_OPTIONS)
    _add(p.add_argument_group("optimiser"), OPTIMISER_OPTIONS)
    _add(p.add_argument_group("augmentation"), AUGMENT_OPTIONS)
    _add(p.add_argument_group("mixing and erasing"), MIXING_OPTIONS)
    _add(p.add_argument_group("devices"), DEVICE_OPTIONS)
    _add(p.add_argument_group("several processes"), PROCESS_OPTIONS)
    output = p.add_argument_group("output")
    # made from the model's and the data's names (config_from_args), not TrainConfig's
    output.add_argument(
        "--output", metavar="DIR", help="run folder (default runs/<variant or init>_<dataset>)"
    )
    _add(output, OUTPUT_OPTIONS)
    p.add_console_options(output, noisy="TensorFlow, JAX and absl")
    return p


def _add(group, options):
    """Adds each (flag, help, settings) of `options` to `group`, its default that of the
    TrainConfig (or AugmentConfig) field it sets: written once, in the config."""
    for flag, help, settings in options:
        dest = settings.get("dest", flag.removeprefix("--").replace("-", "_"))
        config = AUGMENT if dest in AugmentConfig.__dataclass_fields__ else DEFAULTS
        group.add_argument(flag, default=getattr(config, dest), help=help, **settings)


def _verbosity(args) -> int:
    """Keras' progress: none with --quiet, a bar on a terminal, a line per epoch elsewhere."""
    if args.quiet:
        return 0
    return 1 if sys.stderr.isatty() else 2


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of parsed arguments (the same fields, by name)."""
    data_name = args.dataset or os.path.basename(os.path.normpath(args.data_dir))
    model_name = os.path.splitext(os.path.basename(args.init))[0] if args.init else args.variant
    values = vars(args)
    augment = AugmentConfig(**{f: values[f] for f in AugmentConfig.__dataclass_fields__})
    fields = {f: values[f] for f in TrainConfig.__dataclass_fields__ if f in values}
    return TrainConfig(
        **dict(
            fields,
            augment=augment,
            clip_norm=args.clip_norm or None,
            jit_compile=JIT[args.jit_compile],
            output=args.output or os.path.join("runs", f"{model_name}_{data_name}"),
            verbose=_verbosity(args),
        )
    )


def main(argv=None) -> int:
    code = cli.run_parsed(build_parser(), argv, _train)
    jax = sys.modules.get("jax")  # imported: the run may have joined other processes
    if code != errors.EXIT_OK and jax is not None and jax.distributed.is_initialized():
        # A failed process of a multi-process run leaves at once: JAX's exit handler would
        # wait for the others at a shutdown barrier, and abort when they do not come.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args, log, console) -> int:
    from convmixer_tf.train.run import train

    config = config_from_args(args)
    with contextlib.redirect_stdout(console):  # Keras' progress; stdout is for --json
        metrics = train(config, log=log)
    final = metrics["final"]
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in final.items() if k not in ("epoch", "learning_rate")
    )
    log(
        f"done: {metrics['epochs']} epochs; {shown}; {metrics['train_images_per_second']} images/s; "
        f"model in {metrics['model']}"
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    return errors.EXIT_OK


if __name__ == "__main__":
    cli.exit(main())
