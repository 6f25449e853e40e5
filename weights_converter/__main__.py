"""python -m weights_converter: PyTorch ConvMixer checkpoint -> Keras, with parity proven.

Exit codes: 0 success, 1 parity (or an export's verification) failed, 2 bad input,
3 internal error.
"""

from __future__ import annotations

import json
import os

from convmixer_tf import cli, errors
from convmixer_tf.export import __main__ as export_command
from convmixer_tf.export import registry
from convmixer_tf.outputs import jsonable
from weights_converter.parity import DEFAULT_TOLERANCE

EPILOG = """\
examples:
  python -m weights_converter --torch-ckpt convmixer_768_32.pth.tar
  python -m weights_converter --torch-ckpt run/last.pth.tar --use-ema --export all
  python -m weights_converter --torch-ckpt my.safetensors --activation gelu --output out/ --force

It reads .pth/.pth.tar/.pt/.bin (torch.load with weights_only=True: no code from the
file runs) and .safetensors; timm's layout, the paper's nn.Sequential or its
280-character one-liner, or labml.ai's; bare state dicts or ones wrapped in
state_dict / state_dict_ema / model, with or without a 'module.' prefix. The config
(dim, depth, kernel, patch, classes, depthwise or full conv) is read from tensor shapes;
the activation comes from --activation or from the released variant the shapes match
(convmixer_768_32 is ReLU, the others GELU).

Writes DIR/model.keras and DIR/report.json (plus exported files), all at once at the
end: a failure leaves nothing behind. When parity fails DIR holds report.json alone.
--force replaces only an earlier output whose files are all as its RECORD lists.
exit codes: 0 ok, 1 parity or export verification failed, 2 bad input, 3 internal error,
130/143 interrupted.

export formats:
{formats}
"""


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m weights_converter",
        epilog=EPILOG.format(formats=registry.help_text()),
        description="Convert a PyTorch ConvMixer checkpoint to Keras and prove the two compute the same thing.",
    )
    parser.add_argument(
        "--torch-ckpt",
        required=True,
        dest="checkpoint",
        metavar="FILE",
        help="checkpoint to convert",
    )
    _checkpoint_options(parser.add_argument_group("the checkpoint"))
    _parity_options(parser.add_argument_group("the proof"))
    export_command.add_export_options(
        parser.add_argument_group("exports"), flag="--export", default=()
    )
    export_command.add_output_options(
        parser,
        output="output directory (default: next to the checkpoint, NAME_keras)",
        noisy="TensorFlow, LiteRT, torch and absl",
    )
    return parser


def _checkpoint_options(group):
    from convmixer_tf.config import ACTIVATIONS, list_variants

    group.add_argument(
        "--variant",
        choices=list_variants(),
        metavar="NAME",
        help="released variant the checkpoint must be (sets the activation); one of: "
        + ", ".join(list_variants()),
    )
    group.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        help="activation of the Keras model (default: the matched variant's, else gelu)",
    )
    group.add_argument(
        "--use-ema",
        action="store_true",
        help="take the EMA weights (state_dict_ema) of a timm training checkpoint",
    )
    export_command.add_labels_options(
        group,
        "class names, one per line, in output order, stored with the model and packed into "
        "TFLite files (default: ImageNet-1k's for a 1000-class released variant)",
    )


def _parity_options(group):
    group.add_argument(
        "--tolerance",
        type=cli.positive(float),
        default=DEFAULT_TOLERANCE,
        help="max abs difference of float32 logits",
    )
    group.add_argument(
        "--parity-images",
        metavar="DIR|tfds:NAME[:SPLIT]",
        help="also compare on these images (timm's eval preprocessing)",
    )
    group.add_argument(
        "--skip-parity",
        action="store_true",
        help="convert without the PyTorch run (no proof; for machines without torch)",
    )


def main(argv=None) -> int:
    return cli.run_parsed(build_parser(), argv, _convert)


def _convert(args, log, console) -> int:
    from convmixer_tf.export import format_rows
    from weights_converter.pipeline import convert_and_verify

    report = convert_and_verify(options_from(args), log)
    content = report.to_dict()
    if args.json:
        print(json.dumps(content, indent=2, default=jsonable))
    else:
        print(f"{content['status']}: {cli.escaped(report.output)}")
        if report.files:
            print(format_rows(report.files))
    if not report.passed:
        parity = report.parity
        print(
            f"parity FAILED: max |logit diff| {parity.max_abs:.3g} > tolerance {parity.tolerance:.0e}; "
            f"first diverging stage: {parity.first_divergent_stage}; "
            f"details in {cli.escaped(os.path.join(report.output, 'report.json'))}"
        )
    return errors.EXIT_OK if report.passed else errors.EXIT_FAILED


def options_from(args):
    """The ConvertOptions of parsed arguments (the same fields, by name; the exports' from
    the options `add_export_options` declared)."""
    from weights_converter.pipeline import ConvertOptions

    values = vars(args)
    fields = {f: values[f] for f in ConvertOptions.__dataclass_fields__ if f != "export"}
    return ConvertOptions(**fields, export=export_command.export_options_from(args))


if __name__ == "__main__":
    cli.exit(main())
