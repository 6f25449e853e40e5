"""python -m convmixer_tf.export: write exported files of a .keras ConvMixer, each verified.

Exit codes: 0 every file verified, 1 an export failed or did not match Keras,
2 bad input (missing model, unknown format, non-float32 model, existing output),
3 internal error, 130/143 interrupted.
"""

from __future__ import annotations

import json
import os

from convmixer_tf import cli, errors, outputs
from convmixer_tf.config import MAX_INPUT_SIZE, list_variants
from convmixer_tf.errors import BadInput
from convmixer_tf.export import registry
from convmixer_tf.export.calibration import CALIBRATION_COUNT
from convmixer_tf.export.run import DEFAULT_FORMATS
from convmixer_tf.staging import staged

REPORT = "export_report.json"

EPILOG = """\
formats:
{formats}

examples:
  python -m convmixer_tf.export --model model.keras --formats saved_model tflite onnx
  python -m convmixer_tf.export --model model.keras --formats tflite --quantize int8 --calibration-data images/
  python -m convmixer_tf.export --model model.keras --formats onnx --nchw --output out/ --force

Every file is loaded back by its own runtime (tf.saved_model, LiteRT and MediaPipe,
onnxruntime), compared with the Keras model on held-out images, and timed (batch 1,
2 threads). By default the graphs take raw RGB pixels (mean/std inside);
--no-preprocessing keeps the model's own input. TFLite files hold builtin ops only.
Output is written at the end, all at once: a failure leaves nothing behind. --force
replaces only an earlier output that holds nothing but what its RECORD lists, unchanged.
"""


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m convmixer_tf.export",
        description=__doc__.splitlines()[0],
        epilog=EPILOG.format(formats=registry.help_text()),
    )
    parser.add_argument("--model", required=True, metavar="FILE", help="a .keras ConvMixer")
    add_export_options(parser.add_argument_group("what to write"))
    _model_options(parser.add_argument_group("what the files take and give"))
    add_output_options(parser, output="output directory (default: MODEL_export next to the model)")
    return parser


def add_output_options(parser, *, output: str, **console):
    """The group "where and how" of both command lines: --output DIR (`output` its help),
    --force and the console options (`console`: their settings)."""
    group = parser.add_argument_group("where and how")
    group.add_argument("--output", metavar="DIR", help=output)
    group.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier output (only one whose files are all as its RECORD lists)",
    )
    parser.add_console_options(group, **console)


def add_export_options(group, *, flag: str = "--formats", default=DEFAULT_FORMATS):
    """The export options of both command lines, declared here once: the formats (the
    converter's `--export`, none by default), calibration, the files' input and output,
    the processes. `export_options_from` reads them back."""
    group.add_argument(
        flag,
        dest="formats",
        nargs="+",
        default=list(default),
        metavar="FORMAT",
        help=f"write and verify: any of {', '.join(registry.names())}, all",
    )
    group.add_argument(
        "--quantize",
        choices=[
            name.removeprefix("tflite_") for name in registry.names() if name.startswith("tflite_")
        ],
        help="also write this quantised TFLite file (--quantize int8 adds tflite_int8)",
    )
    group.add_argument(
        "--calibration-data",
        metavar="DIR|tfds:NAME[:SPLIT]",
        help="images for int8 calibration and the held-out checks (default: synthetic images, "
        "which the report says)",
    )
    group.add_argument(
        "--calibration-count",
        type=cli.positive(),
        default=CALIBRATION_COUNT,
        metavar="N",
        help="int8 calibration images (about seconds per image on a large model)",
    )
    _file_options(group)


def _file_options(group):
    group.add_argument(
        "--no-preprocessing",
        dest="raw_rgb",
        action="store_false",
        help="files take normalised input, like the model (default: raw RGB, mean/std inside)",
    )
    group.add_argument(
        "--tflite-logits",
        dest="tflite_output",
        action="store_const",
        const="logits",
        default="probabilities",
        help="TFLite files output logits (default: probabilities, a softmax at the end)",
    )
    group.add_argument(
        "--nchw", action="store_true", help="ONNX input as [N, 3, H, W] (PyTorch order)"
    )
    group.add_argument("--opset", type=int, help="ONNX opset (13-18, default 17)")
    group.add_argument(
        "--processes",
        type=cli.positive(),
        metavar="N",
        help="1: write the files one after the other, in the least memory; default: formats that "
        "share no work side by side, in processes of their own, where cores and memory allow",
    )


def _model_options(group):
    group.add_argument(
        "--variant",
        choices=list_variants(),
        metavar="NAME",
        help="take input size, mean and std from this variant (default: those stored with the model)",
    )
    group.add_argument(
        "--image-size",
        type=cli.positive(most=MAX_INPUT_SIZE),
        metavar="PIXELS",
        help="input size for models saved with a dynamic size",
    )
    add_labels_options(
        group, "class names, one per line, in output order (default: those stored with the model)"
    )


def add_labels_options(group, help: str):
    """--labels FILE (`help` its help) and --allow-duplicate-labels, of both command lines."""
    group.add_argument("--labels", metavar="FILE", help=help)
    group.add_argument(
        "--allow-duplicate-labels",
        action="store_true",
        help="accept a labels file that names two classes alike",
    )


def main(argv=None) -> int:
    return cli.run_parsed(build_parser(), argv, _export)


def _export(args, log, console) -> int:
    from convmixer_tf import export as exporters
    from convmixer_tf.facts import facts_of
    from convmixer_tf.labels import check_class_names

    options = _options_from(args)
    output = args.output or default_output(args.model)
    inputs = [args.model, args.calibration_data, args.labels]
    with staged(output, args.force, inputs) as staging:  # checked before the model loads
        model = load_float32_model(args.model)
        if options.class_names is not None:  # before any work
            check_class_names(options.class_names, facts_of(model).config.num_classes)
        rows = exporters.export_formats(model, staging.path, options, log=log)
        outputs.write_json_atomic(os.path.join(staging.path, REPORT), rows)
    print(json.dumps(rows, indent=2) if args.json else exporters.format_rows(rows, staging.output))
    return errors.EXIT_OK


def export_options_from(args, **fields):
    """The ExportOptions of parsed arguments (the same fields, by name: the options
    `add_export_options` declared, and --image-size), with `fields` a command sets from
    options of its own."""
    from convmixer_tf.export.run import ExportOptions, check_formats

    values = {f: v for f, v in vars(args).items() if f in ExportOptions.__dataclass_fields__}
    quantized = [f"tflite_{args.quantize}"] if args.quantize else []
    values["formats"] = tuple(check_formats(args.formats + quantized))
    return ExportOptions(**values, **fields)


def _options_from(args):
    """The ExportOptions of this command (a labels file read and checked line by line)."""
    from convmixer_tf.config import get_variant
    from convmixer_tf.labels import read_labels

    labels = read_labels(args.labels, args.allow_duplicate_labels) if args.labels else None
    return export_options_from(
        args,
        preprocessing=get_variant(args.variant).preprocessing if args.variant else None,
        class_names=labels,
    )


def default_output(model) -> str:
    """`dir/m.keras` -> `dir/m_export`; `hf://OWNER/NAME[@REVISION]` -> `./NAME_export`."""
    from convmixer_tf.saving import HUB_SCHEME

    if str(model).startswith(HUB_SCHEME):
        name = str(model)[len(HUB_SCHEME) :].partition("@")[0].rstrip("/").split("/")[-1]
        return os.path.abspath(f"{name}_export")
    return os.path.splitext(os.path.abspath(model))[0] + "_export"


def load_float32_model(path):
    from convmixer_tf.saving import load_model

    model = load_model(path)
    policies = {layer.dtype_policy.name for layer in model.layers}
    if policies != {"float32"}:
        raise BadInput(
            f"{path} computes in {sorted(policies)}; export needs a float32 model (mixed-precision "
            "exports fail in TFLite and ONNX): rebuild it in float32 and copy the weights"
        )
    return model


if __name__ == "__main__":
    cli.exit(main())
