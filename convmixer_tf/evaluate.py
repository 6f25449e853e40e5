"""Command line: top-1 / top-5 and loss of a model on a dataset (logic: convmixer_tf.evaluation).

    python -m convmixer_tf.evaluate --model converted/model.keras --dataset imagenet2012 \\
        --manual-dir ~/imagenet --offline
    python -m convmixer_tf.evaluate --model runs/c10/model.keras --dataset cifar10 --json

Exit status: 0 done, 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from convmixer_tf.config import list_variants
from convmixer_tf.export.cli import start


def _floats3(text):
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m convmixer_tf.evaluate",
        description="Top-1 / top-5 accuracy and cross-entropy of a .keras model with timm's evaluation "
                    "transform (resize the shorter side to size/crop_pct, centre crop, mean/std). The "
                    "transform is the variant's when the model is named after one (or --preset).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL.keras")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help="tensorflow-datasets name (cifar10, imagenet2012, ...)")
    data.add_argument("--data-dir", metavar="DIR", help="image folder: DIR/val/<class>/* if present, else DIR/<class>/*")
    p.add_argument("--split", metavar="SPLIT", help="tfds split (default validation, or test)")
    p.add_argument("--tfds-data-dir", metavar="DIR")
    p.add_argument("--manual-dir", metavar="DIR")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--preset", choices=list_variants(), metavar="VARIANT", help="take this variant's transform")
    p.add_argument("--input-size", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest", "area"))
    p.add_argument("--mean", type=_floats3, metavar="R,G,B", help="for a model without a preprocessing layer")
    p.add_argument("--std", type=_floats3, metavar="R,G,B")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--output", metavar="FILE.json", help="also write the metrics here")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = start(args.quiet)
    try:
        if not os.path.isfile(args.model):
            raise ValueError(f"--model not found: {args.model}")
        if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
            raise ValueError("--batch-size and --limit must be positive")
        import keras

        from convmixer_tf.data import open_dataset
        from convmixer_tf.evaluation import evaluate, preprocessing_for
        from convmixer_tf.model import config_from_model

        try:
            model = keras.models.load_model(args.model, compile=False)
        except Exception as err:  # noqa: BLE001 - any reason the file does not load
            raise ValueError(f"cannot load --model {args.model}: {str(err).splitlines()[0]}") from None
        config_from_model(model)
        preprocessing = preprocessing_for(
            model, args.preset, input_size=args.input_size, crop_pct=args.crop_pct,
            interpolation=args.interpolation, mean=args.mean, std=args.std)
        if args.data_dir:
            source = open_dataset(data_dir=args.data_dir, val_fraction=0.0)
            dataset = source.val if source.val is not None else source.train
        else:
            source = open_dataset(args.dataset, tfds_data_dir=args.tfds_data_dir, manual_dir=args.manual_dir,
                                  offline=args.offline, val_split=args.split)
            if source.val is None:
                raise ValueError(f"dataset {args.dataset!r} has no validation or test split; name one with --split")
            dataset = source.val
        log(f"evaluating {args.model} on {source.name} ({preprocessing.input_size} px, crop_pct "
            f"{preprocessing.crop_pct}, {preprocessing.interpolation})")
        metrics = evaluate(model, dataset, preprocessing, batch_size=args.batch_size, limit=args.limit, log=log)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics.update(model=args.model, dataset=source.name)
    log(f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  "
        f"({metrics['count']} images, {metrics['seconds']} s)")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
        os.replace(tmp, args.output)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
