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


def build_parser():
    p = cli.ArgumentParser(
        prog="python -m convmixer_tf.train",
        description="Train or fine-tune a ConvMixer on a tensorflow-datasets set or an image folder. "
        "Defaults are the paper's CIFAR-10 recipe (ConvMixer-256/8, 25 epochs, batch 512, "
        "AdamW lr 0.05 wd 0.005, one-cycle, RandAugment 2/12). The output folder gets "
        "model.keras (float32, stock layers, class names inside), metrics.json, history.csv, "
        "TensorBoard logs and a backup: the same command resumes a killed run.",
    )
    _model_options(p.add_argument_group("model"))
    _data_options(p.add_argument_group("data"))
    _schedule_options(p.add_argument_group("schedule"))
    _optimiser_options(p.add_argument_group("optimiser"))
    _augment_options(p.add_argument_group("augmentation"))
    _mixing_options(p.add_argument_group("mixing and erasing"))
    _device_options(p.add_argument_group("devices"))
    _process_options(p.add_argument_group("several processes"))
    output = p.add_argument_group("output")
    _output_options(output)
    p.add_console_options(output, noisy="TensorFlow, JAX and absl")
    return p


def _model_options(group):
    """What to train: a variant from scratch, or a model to start from."""
    group.add_argument(
        "--variant",
        default=DEFAULTS.variant,
        choices=list_variants(),
        metavar="NAME",
        help="architecture to train from scratch: " + ", ".join(list_variants()),
    )
    group.add_argument(
        "--init",
        metavar="MODEL.keras",
        help="start from this model (e.g. a converted checkpoint); a new head when the class count differs",
    )
    group.add_argument(
        "--image-size",
        type=cli.positive(most=MAX_INPUT_SIZE),
        metavar="PIXELS",
        help="training resolution (default: the variant's)",
    )


def _data_options(group):
    """Where the images come from."""
    data = group.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--dataset",
        metavar="NAME",
        help="tensorflow-datasets name: cifar10, cifar100, imagenette, imagenet2012, ...",
    )
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        help="image folder: DIR/<class>/*, or DIR/train/<class>/* with DIR/val/<class>/*",
    )
    group.add_argument(
        "--tfds-data-dir", metavar="DIR", help="where tfds keeps prepared datasets (offline copies)"
    )
    group.add_argument(
        "--manual-dir", metavar="DIR", help="tfds manual_dir (imagenet2012's tar files)"
    )
    group.add_argument(
        "--offline", action="store_true", help="never download; an unprepared dataset is an error"
    )
    group.add_argument(
        "--train-split", metavar="SPLIT", help="tfds split to train on (default train)"
    )
    group.add_argument(
        "--val-split",
        metavar="SPLIT",
        help="tfds split to validate on (default validation or test; 'none' skips)",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS.val_fraction,
        help="held-out share of a folder without val/",
    )
    group.add_argument(
        "--strict-images",
        action="store_true",
        help="an image that does not decode is an error (default: it is left out, with a warning naming "
        "it, and counted in metrics.json)",
    )


def _schedule_options(group):
    """How long, in what batches, at what learning rate."""
    group.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="training epochs")
    group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="global batch, split over devices",
    )
    group.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (quick runs)")
    group.add_argument("--val-steps", type=int, help="cap on validation batches")
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    group.add_argument(
        "--schedule", default=DEFAULTS.schedule, choices=SCHEDULES, help="learning rate over time"
    )
    group.add_argument(
        "--warmup-epochs",
        type=float,
        default=DEFAULTS.warmup_epochs,
        help="linear warmup of the cosine schedule",
    )


def _optimiser_options(group):
    """AdamW and what is trained."""
    group.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULTS.weight_decay,
        help="AdamW decoupled weight decay",
    )
    group.add_argument(
        "--clip-norm",
        type=float,
        default=DEFAULTS.clip_norm,
        help="global gradient-norm clipping (0 turns it off)",
    )
    group.add_argument(
        "--label-smoothing",
        type=float,
        default=DEFAULTS.label_smoothing,
        help="label smoothing of the cross-entropy",
    )
    group.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=DEFAULTS.backbone_lr_mult,
        help="learning-rate factor for all layers but the head",
    )
    group.add_argument("--freeze-backbone", action="store_true", help="train the head only")


def _augment_options(group):
    """RandomResizedCrop, flips and RandAugment."""
    group.add_argument(
        "--scale",
        type=cli.floats(2),
        default=AUGMENT.scale,
        metavar="MIN,MAX",
        help="RandomResizedCrop area range",
    )
    group.add_argument(
        "--ratio",
        type=cli.floats(2),
        default=AUGMENT.ratio,
        metavar="MIN,MAX",
        help="RandomResizedCrop aspect ratios",
    )
    group.add_argument(
        "--no-flip", dest="hflip", action="store_false", help="no random horizontal flips"
    )
    group.add_argument(
        "--ra-n",
        dest="randaugment_n",
        type=int,
        default=AUGMENT.randaugment_n,
        metavar="N",
        help="RandAugment ops per image (0: off)",
    )
    group.add_argument(
        "--ra-m",
        dest="randaugment_m",
        type=int,
        default=AUGMENT.randaugment_m,
        metavar="M",
        help="RandAugment magnitude, 0-30",
    )


def _mixing_options(group):
    """Colour jitter, random erasing, mixup and cutmix."""
    group.add_argument(
        "--jitter", type=float, default=AUGMENT.jitter, help="colour jitter strength"
    )
    group.add_argument(
        "--reprob",
        dest="erasing",
        type=float,
        default=AUGMENT.erasing,
        metavar="P",
        help="random erasing probability",
    )
    group.add_argument("--mixup", type=float, default=AUGMENT.mixup, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=AUGMENT.cutmix, help="cutmix alpha (0: off)")


def _device_options(group):
    """Precision, XLA and how the batch is split over devices."""
    group.add_argument(
        "--precision",
        default=DEFAULTS.precision,
        choices=tuple(PRECISIONS),
        help="mixed precision compute (the head and the saved model stay float32)",
    )
    group.add_argument(
        "--jit-compile",
        choices=tuple(JIT),
        default="auto",
        metavar="auto|on|off",
        help="XLA; auto leaves it off on CPU, where it is slower",
    )
    group.add_argument(
        "--distribute",
        default=DEFAULTS.distribute,
        choices=DISTRIBUTIONS,
        help="mirrored: tf.distribute over one host's devices (TensorFlow backend); data-parallel: "
        "keras.distribution over one process's devices (JAX backend); multi-process: "
        "keras.distribution over every device of several processes or hosts (JAX backend, JAX's "
        "distributed runtime)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed of the data order, augmentation and new weights",
    )


def _process_options(group):
    """Several processes (--distribute multi-process)."""
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-process: process 0's HOST:PORT, which every process connects to (not needed under "
        "SLURM or Open MPI)",
    )
    group.add_argument(
        "--num-processes", type=int, help="multi-process: how many processes train together"
    )
    group.add_argument(
        "--process-id", type=int, help="multi-process: this process's index, 0 to N-1"
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=DEFAULTS.heartbeat_timeout,
        help="multi-process: seconds after which a process that stopped answering counts as dead, and "
        "the others stop with an error",
    )


def _output_options(group):
    """The run folder."""
    group.add_argument(
        "--output", metavar="DIR", help="run folder (default runs/<variant or init>_<dataset>)"
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="start over in --output, replacing an earlier run there once the new one has finished "
        "(never a folder of anything else)",
    )
    group.add_argument(
        "--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard logs"
    )


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
