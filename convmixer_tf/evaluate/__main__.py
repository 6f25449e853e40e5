"""python -m convmixer_tf.evaluate: top-1 / top-5 and loss of a model on a dataset
(the job: convmixer_tf.evaluate).

    python -m convmixer_tf.evaluate --model converted/model.keras --dataset imagenet2012 \\
        --manual-dir ~/imagenet --offline
    python -m convmixer_tf.evaluate --model runs/c10/model.keras --dataset cifar10 --json

Exit status: 0 done, 2 bad arguments or data, 3 internal error, 130/143 interrupted.
"""

from __future__ import annotations

import json

from convmixer_tf import cli, errors, outputs
from convmixer_tf.config import INTERPOLATIONS, MAX_INPUT_SIZE, list_variants
from convmixer_tf.data import open_dataset, warn_skipped
from convmixer_tf.errors import BadInput
from convmixer_tf.evaluate import check_classes, evaluate, is_metrics, preprocessing_for

TRANSFORM = ("input_size", "crop_pct", "interpolation", "mean", "std")  # options that change it


def build_parser():
    p = cli.ArgumentParser(
        prog="python -m convmixer_tf.evaluate",
        description="Top-1 / top-5 accuracy and cross-entropy of a .keras model with timm's evaluation "
        "transform (resize the shorter side to size/crop_pct, centre crop, mean/std): the one "
        "stored with the model, or a variant's (--preset), or given piece by piece.",
    )
    p.add_argument("--model", required=True, metavar="MODEL.keras")
    _data_options(p.add_argument_group("the data"))
    _transform_options(
        p.add_argument_group("the transform (default: the one stored with the model)")
    )
    output = p.add_argument_group("output")
    output.add_argument("--batch-size", type=cli.positive(), default=64)
    output.add_argument("--limit", type=cli.positive(), help="only the first N images")
    output.add_argument(
        "--output",
        metavar="FILE.json",
        help="also write the metrics here (a new file, or an earlier one of this command)",
    )
    p.add_console_options(output, noisy="TensorFlow and absl")
    return p


def _data_options(group):
    data = group.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--dataset", metavar="NAME", help="tensorflow-datasets name (cifar10, imagenet2012, ...)"
    )
    data.add_argument(
        "--data-dir",
        metavar="DIR",
        help="image folder: DIR/val/<class>/* if present, else DIR/<class>/*",
    )
    group.add_argument("--split", metavar="SPLIT", help="tfds split (default validation, or test)")
    group.add_argument("--tfds-data-dir", metavar="DIR")
    group.add_argument("--manual-dir", metavar="DIR")
    group.add_argument("--offline", action="store_true", help="never download")
    group.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="score even when the dataset's classes are not the model's (said in the output)",
    )
    group.add_argument(
        "--strict-images",
        action="store_true",
        help="an image that does not decode is an error (default: left out with a warning, and counted)",
    )


def _transform_options(group):
    group.add_argument(
        "--preset", choices=list_variants(), metavar="VARIANT", help="take this variant's transform"
    )
    group.add_argument(
        "--input-size",
        type=cli.positive(most=MAX_INPUT_SIZE),
        metavar="PIXELS",
        help="side of the centre crop the model sees",
    )
    group.add_argument(
        "--crop-pct", type=cli.fraction, help="share of the resized image the crop keeps, in (0, 1]"
    )
    group.add_argument("--interpolation", choices=INTERPOLATIONS)
    group.add_argument(
        "--mean",
        type=cli.floats(3),
        metavar="R,G,B",
        help="for a model without a preprocessing layer",
    )
    group.add_argument("--std", type=cli.floats(3, positive=True), metavar="R,G,B")


def main(argv=None) -> int:
    return cli.run_parsed(build_parser(), argv, _evaluate)


def _evaluate(args, log, console) -> int:
    from convmixer_tf.saving import load_model

    inputs = [args.model, args.data_dir]
    if args.output:
        outputs.check_file(args.output, is_metrics, inputs)
    model = load_model(args.model, role="--model")
    transform = {key: getattr(args, key) for key in TRANSFORM}
    preprocessing = preprocessing_for(model, args.preset, **transform)
    source, dataset = _dataset(args)
    classes = check_classes(model, source.class_names, args.allow_class_mismatch)
    if classes.startswith(("class mismatch", "the model stores no")):
        log(f"warning: {classes}")
    warn_skipped(source, log)
    log(
        f"evaluating {args.model} on {source.name} ({preprocessing.input_size} px, crop_pct "
        f"{preprocessing.crop_pct}, {preprocessing.interpolation})"
    )
    metrics = evaluate(
        model, dataset, preprocessing, batch_size=args.batch_size, limit=args.limit, log=log
    )
    skipped = [{"file": path, "reason": reason} for path, reason in source.skipped]
    metrics.update(model=args.model, dataset=source.name, classes=classes, skipped_images=skipped)
    _report(args, metrics, inputs, log)
    return errors.EXIT_OK


def _report(args, metrics, inputs, log) -> None:
    """The metrics on stderr, in --output and, with --json, on stdout."""
    left_out = metrics["skipped_images"]
    skipped = f", {len(left_out)} unreadable images left out" if left_out else ""
    log(
        f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  "
        f"({metrics['count']} images{skipped}, {metrics['seconds']} s)"
    )
    if args.output:  # looked at again: what is there now must still be ours to replace
        earlier = outputs.check_file(args.output, is_metrics, inputs)
        outputs.write_json_atomic(args.output, metrics, exclusive=not earlier)
    if args.json:
        print(json.dumps(metrics, indent=2))


def _dataset(args):
    """(DataSource, the split to score) of --data-dir or --dataset."""
    if args.data_dir:
        source = open_dataset(
            data_dir=args.data_dir, val_fraction=0.0, strict_images=args.strict_images
        )
        return source, source.val if source.val is not None else source.train
    source = open_dataset(
        args.dataset,
        tfds_data_dir=args.tfds_data_dir,
        manual_dir=args.manual_dir,
        offline=args.offline,
        val_split=args.split,
    )
    if source.val is None:
        raise BadInput(
            f"dataset {args.dataset!r} has no validation or test split; name one with --split"
        )
    return source, source.val


if __name__ == "__main__":
    cli.exit(main())
