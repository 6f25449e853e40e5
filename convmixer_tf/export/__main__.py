"""python -m convmixer_tf.export: write SavedModel / TFLite / ONNX files, each verified.

Exit codes: 0 every file verified, 1 an export failed or did not match Keras,
2 bad input (missing model, unknown format, non-float32 model, existing output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FORMAT_NAMES = ("saved_model", "tflite", "tflite_float16", "tflite_dynamic", "tflite_int8", "onnx", "all")

EPILOG = """\
examples:
  python -m convmixer_tf.export --model model.keras --formats saved_model tflite onnx
  python -m convmixer_tf.export --model model.keras --formats tflite --quantize int8 --calibration-data images/
  python -m convmixer_tf.export --model model.keras --formats onnx --nchw --output out/ --force

Every file is loaded back by its own runtime (tf.saved_model, LiteRT, onnxruntime),
compared with the Keras model on held-out images, and timed (batch 1, 2 threads).
By default the graphs take raw 0-255 RGB (mean/std inside); --no-preprocessing keeps
the model's own input. TFLite files hold builtin ops only. Output is written at the
end, all at once: a failure leaves nothing behind.
"""


def build_parser():
    from convmixer_tf.config import list_variants

    parser = argparse.ArgumentParser(prog="python -m convmixer_tf.export", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="FILE", help="a .keras ConvMixer")
    parser.add_argument("--formats", nargs="+", default=["saved_model", "tflite", "onnx"], metavar="FORMAT",
                        help=f"any of: {', '.join(FORMAT_NAMES)} (default: saved_model tflite onnx)")
    parser.add_argument("--quantize", choices=("float16", "dynamic", "int8"),
                        help="also write this quantised TFLite file")
    parser.add_argument("--calibration-data", metavar="DIR|tfds:NAME[:SPLIT]",
                        help="images for int8 calibration and held-out checks (default: synthetic images)")
    parser.add_argument("--calibration-count", type=int, default=64, metavar="N",
                        help="int8 calibration images (default 64; about seconds per image on a large model)")
    parser.add_argument("--variant", choices=list_variants(), metavar="NAME",
                        help="take input size, mean and std from this variant (default: ImageNet, 224)")
    parser.add_argument("--image-size", type=int, help="input size for models saved with a dynamic size")
    parser.add_argument("--no-preprocessing", action="store_true", help="files take normalised input, like the model")
    parser.add_argument("--nchw", action="store_true", help="ONNX input as [N, 3, H, W] (PyTorch order)")
    parser.add_argument("--opset", type=int, help="ONNX opset (13-18, default 17)")
    parser.add_argument("--output", metavar="DIR", help="output directory (default: MODEL_export next to the model)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from convmixer_tf.export import cli

    log = cli.start(args.quiet)

    try:
        from convmixer_tf import export as exporters
        from convmixer_tf.export.files import check_output, staged_output

        formats = exporters.check_formats(args.formats + ([f"tflite_{args.quantize}"] if args.quantize else []))
        output = check_output(args.output or os.path.splitext(os.path.abspath(args.model))[0] + "_export", args.force)
        model = load_float32_model(args.model)
        preprocessing = _preprocessing(args)
        with staged_output(output, args.force) as staging:
            rows = exporters.export_formats(model, staging, formats, calibration_data=args.calibration_data,
                                            preprocessing=preprocessing, raw_rgb=not args.no_preprocessing,
                                            nchw=args.nchw, opset=args.opset, log=log,
                                            calibration_count=args.calibration_count)
            with open(os.path.join(staging, "export_report.json"), "w") as f:
                json.dump(rows, f, indent=2)
    except exporters.ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_rows(rows, output))
    return 0


def load_float32_model(path):
    import keras

    if not os.path.isfile(path):
        raise ValueError(f"model not found: {path}")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:
        raise ValueError(f"cannot load {path} as a Keras model: {' '.join(str(err).split())[:300]}") from None
    policies = {layer.dtype_policy.name for layer in model.layers}
    if policies != {"float32"}:
        raise ValueError(f"{path} computes in {sorted(policies)}; export needs a float32 model "
                         "(mixed-precision exports fail in TFLite and ONNX): rebuild it in float32 and copy the weights")
    return model


def _preprocessing(args):
    from convmixer_tf.config import Preprocessing, get_variant

    pre = get_variant(args.variant).preprocessing if args.variant else Preprocessing()
    if args.image_size:
        pre = Preprocessing(args.image_size, pre.crop_pct, pre.interpolation, pre.mean, pre.std)
    return pre


def format_rows(rows, output) -> str:
    lines = [f"wrote {output}",
             f"  {'format':<15} {'file':<22} {'size':>9} {'max|diff|':>10} {'top-1':>7} {'latency':>10}"]
    for r in rows:
        top1 = "n/a" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1%}"
        lines.append(f"  {r['format']:<15} {r['path']:<22} {r['bytes'] / 1e6:7.1f}MB {r['max_abs']:10.2e} "
                     f"{top1:>7} {r['latency_ms']:8.1f}ms")
    lines.append(f"  checked on: {rows[0]['inputs']} ({rows[0]['input']})" if rows else "")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
