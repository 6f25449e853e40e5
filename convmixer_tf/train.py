"""Command line: train or fine-tune a ConvMixer (the logic is convmixer_tf.training).

    python -m convmixer_tf.train --variant convmixer_256_8 --dataset cifar10 --output runs/c10
    python -m convmixer_tf.train --init converted/model.keras --data-dir flowers/ \\
        --image-size 224 --epochs 10 --batch-size 64 --lr 1e-3 --backbone-lr-mult 0.1 \\
        --schedule cosine --warmup-epochs 1 --label-smoothing 0.1

Exit status: 0 done, 1 the run failed (loss not finite), 2 bad arguments or data.
Run the same command again after a kill to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from convmixer_tf.augment import AugmentConfig
from convmixer_tf.config import list_variants
from convmixer_tf.export.cli import start


def _pair(text):
    values = [float(v) for v in text.split(",")]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return tuple(values)


def _jit(text):
    try:
        return {"auto": "auto", "on": True, "off": False}[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = AugmentConfig()
    p = argparse.ArgumentParser(
        prog="python -m convmixer_tf.train",
        description="Train or fine-tune a ConvMixer on a tensorflow-datasets set or an image folder. "
                    "Defaults are the paper's CIFAR-10 recipe (ConvMixer-256/8, 25 epochs, batch 512, "
                    "AdamW lr 0.05 wd 0.005, one-cycle, RandAugment 2/12). The output folder gets "
                    "model.keras (float32, stock layers), metrics.json, history.csv, TensorBoard logs "
                    "and a backup: the same command resumes a killed run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model and data")
    src.add_argument("--variant", default="convmixer_256_8", choices=list_variants(), metavar="NAME",
                     help=f"architecture to train from scratch: {', '.join(list_variants())}")
    src.add_argument("--init", metavar="MODEL.keras",
                     help="start from this model (e.g. a converted checkpoint); a new head when the class count differs")
    data = src.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help="tensorflow-datasets name: cifar10, cifar100, imagenette, imagenet2012, ...")
    data.add_argument("--data-dir", metavar="DIR",
                      help="image folder: DIR/<class>/*, or DIR/train/<class>/* with DIR/val/<class>/*")
    src.add_argument("--tfds-data-dir", metavar="DIR", help="where tfds keeps prepared datasets (offline copies)")
    src.add_argument("--manual-dir", metavar="DIR", help="tfds manual_dir (imagenet2012's tar files)")
    src.add_argument("--offline", action="store_true", help="never download; an unprepared dataset is an error")
    src.add_argument("--train-split", metavar="SPLIT", help="tfds split to train on (default train)")
    src.add_argument("--val-split", metavar="SPLIT", help="tfds split to validate on (default validation or test; 'none' skips)")
    src.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of a folder without val/")
    src.add_argument("--image-size", type=int, help="training resolution (default: the variant's)")

    run = p.add_argument_group("schedule and optimiser")
    run.add_argument("--epochs", type=int, default=25)
    run.add_argument("--batch-size", type=int, default=512, help="global batch, split over devices")
    run.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (quick runs)")
    run.add_argument("--val-steps", type=int, help="cap on validation batches")
    run.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    run.add_argument("--weight-decay", type=float, default=0.005, help="AdamW decoupled weight decay")
    run.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), default="onecycle")
    run.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup of the cosine schedule")
    run.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping (0 turns it off)")
    run.add_argument("--label-smoothing", type=float, default=0.0)
    run.add_argument("--backbone-lr-mult", type=float, default=1.0, help="learning-rate factor for all layers but the head")
    run.add_argument("--freeze-backbone", action="store_true", help="train the head only")

    aug = p.add_argument_group("augmentation")
    aug.add_argument("--scale", type=_pair, default=defaults.scale, metavar="MIN,MAX", help="RandomResizedCrop area range")
    aug.add_argument("--ratio", type=_pair, default=defaults.ratio, metavar="MIN,MAX", help="RandomResizedCrop aspect ratios")
    aug.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    aug.add_argument("--ra-n", type=int, default=defaults.randaugment_n, help="RandAugment ops per image (0: off)")
    aug.add_argument("--ra-m", type=int, default=defaults.randaugment_m, help="RandAugment magnitude, 0-30")
    aug.add_argument("--jitter", type=float, default=defaults.jitter, help="colour jitter strength")
    aug.add_argument("--reprob", type=float, default=defaults.erasing, help="random erasing probability")
    aug.add_argument("--mixup", type=float, default=defaults.mixup, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=defaults.cutmix, help="cutmix alpha (0: off)")

    dev = p.add_argument_group("devices and output")
    dev.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="mixed precision compute (the head and the saved model stay float32)")
    dev.add_argument("--jit-compile", type=_jit, default="auto", choices=("auto", True, False), metavar="auto|on|off",
                     help="XLA; auto leaves it off on CPU, where it is slower")
    dev.add_argument("--distribute", choices=("auto", "none", "mirrored", "data-parallel"), default="auto",
                     help="mirrored: tf.distribute (TensorFlow backend); data-parallel: keras.distribution (JAX backend)")
    dev.add_argument("--seed", type=int, default=0)
    dev.add_argument("--output", metavar="DIR", help="run folder (default runs/<variant or init>_<dataset>)")
    dev.add_argument("--force", action="store_true", help="start over, deleting what --output holds")
    dev.add_argument("--no-tensorboard", action="store_true")
    dev.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    dev.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    return p


def config_from_args(args):
    from convmixer_tf.training import TrainConfig
    import os

    data_name = args.dataset or os.path.basename(os.path.normpath(args.data_dir))
    model_name = os.path.splitext(os.path.basename(args.init))[0] if args.init else args.variant
    augment = AugmentConfig(scale=args.scale, ratio=args.ratio, hflip=not args.no_flip,
                            randaugment_n=args.ra_n, randaugment_m=args.ra_m, jitter=args.jitter,
                            erasing=args.reprob, mixup=args.mixup, cutmix=args.cutmix)
    return TrainConfig(
        variant=args.variant, init=args.init, dataset=args.dataset, data_dir=args.data_dir,
        tfds_data_dir=args.tfds_data_dir, manual_dir=args.manual_dir, offline=args.offline,
        train_split=args.train_split, val_split=args.val_split, val_fraction=args.val_fraction,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch, val_steps=args.val_steps, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        clip_norm=args.clip_norm or None, label_smoothing=args.label_smoothing,
        backbone_lr_mult=args.backbone_lr_mult, freeze_backbone=args.freeze_backbone, augment=augment,
        precision=args.precision, jit_compile=args.jit_compile, distribute=args.distribute, seed=args.seed,
        output=args.output or os.path.join("runs", f"{model_name}_{data_name}"), force=args.force,
        tensorboard=not args.no_tensorboard, verbose=0 if args.quiet else (1 if sys.stderr.isatty() else 2),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = start(args.quiet)
    try:
        config = config_from_args(args)
        from convmixer_tf.training import TrainingError, train

        with contextlib.redirect_stdout(sys.stderr):  # Keras' progress; stdout is for --json
            metrics = train(config, log=log)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    final = metrics["final"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("epoch", "learning_rate"))
    log(f"done: {metrics['epochs']} epochs; {shown}; {metrics['train_images_per_second']} images/s; "
        f"model in {metrics['model']}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
