"""Command line: train or fine-tune a ConvMixer (the logic is convmixer_tf.training).

    python -m convmixer_tf.train --variant convmixer_256_8 --dataset cifar10 --output runs/c10
    python -m convmixer_tf.train --init converted/model.keras --data-dir flowers/ \\
        --image-size 224 --epochs 10 --batch-size 64 --lr 1e-3 --backbone-lr-mult 0.1 \\
        --schedule cosine --warmup-epochs 1 --label-smoothing 0.1

Exit status: 0 done, 1 the run failed (loss not finite), 2 bad arguments or data,
3 internal error. Run the same command again after a kill to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from convmixer_tf import common
from convmixer_tf.recipe import OPTION_GROUPS, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The options, generated from TrainConfig's fields (names, types, defaults, help)."""
    p = common.ArgumentParser(
        prog="python -m convmixer_tf.train",
        description="Train or fine-tune a ConvMixer on a tensorflow-datasets set or an image folder. "
                    "Defaults are the paper's CIFAR-10 recipe (ConvMixer-256/8, 25 epochs, batch 512, "
                    "AdamW lr 0.05 wd 0.005, one-cycle, RandAugment 2/12). The output folder gets "
                    "model.keras (float32, stock layers, class names inside), metrics.json, history.csv, "
                    "TensorBoard logs and a backup: the same command resumes a killed run.",
        formatter_class=common.HelpFormatter,
    )
    groups = {name: p.add_argument_group(name) for name in OPTION_GROUPS}
    data = groups[OPTION_GROUPS[0]].add_mutually_exclusive_group(required=True)
    for name in ("dataset", "data_dir"):
        _by_hand(data, name)
    common.add_dataclass_options(p, TrainConfig, groups)
    out = groups[OPTION_GROUPS[-1]]
    _by_hand(out, "output", default=None)
    out.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    out.add_argument("--verbose", action="store_true", help="let TensorFlow, JAX and absl print their logs")
    out.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    return p


def _by_hand(group, name, **overrides):
    import dataclasses

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    cli = {k: v for k, v in field.metadata["cli"].items() if k != "by_hand"}
    group.add_argument("--" + name.replace("_", "-"), dest=name, **dict(cli, **overrides))


def config_from_args(args) -> TrainConfig:
    data_name = args.dataset or os.path.basename(os.path.normpath(args.data_dir))
    model_name = os.path.splitext(os.path.basename(args.init))[0] if args.init else args.variant
    return common.dataclass_from_args(
        TrainConfig, args, output=args.output or os.path.join("runs", f"{model_name}_{data_name}"),
        verbose=0 if args.quiet else (1 if sys.stderr.isatty() else 2))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code = common.run_command(lambda log, console: _train(args, log, console), quiet=args.quiet,
                              verbose=args.verbose)
    if code != common.EXIT_OK and _joined_other_processes():
        # A failed process of a multi-process run leaves at once: JAX's exit handler would
        # wait for the others at a shutdown barrier, and abort when they do not come.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _joined_other_processes() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _train(args, log, console) -> int:
    config = config_from_args(args)
    from convmixer_tf.training import train

    with contextlib.redirect_stdout(console):  # Keras' progress; stdout is for --json
        metrics = train(config, log=log)
    final = metrics["final"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("epoch", "learning_rate"))
    log(f"done: {metrics['epochs']} epochs; {shown}; {metrics['train_images_per_second']} images/s; "
        f"model in {metrics['model']}")
    if args.json:
        print(json.dumps(metrics, indent=2))
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
