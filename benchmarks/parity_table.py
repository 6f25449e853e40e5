"""Parity of the three released variants: timm model (random weights, randomised
BatchNorm statistics) -> checkpoint file -> converter -> report, one row each.

    python benchmarks/parity_table.py [--images N]
"""

from __future__ import annotations

import os
import tempfile

from convmixer_tf import cli
from convmixer_tf.config import list_variants

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DESCRIPTION, _, EPILOG = __doc__.partition("\n\n")
VARIANTS = ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"]


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="benchmarks/parity_table.py", description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument(
        "--variants", nargs="+", default=VARIANTS, choices=list_variants(), metavar="NAME"
    )
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args), verbose=True)


def _run(args) -> int:

    import timm
    import torch

    import weights_converter  # noqa: F401  (keeps triton out before TensorFlow loads)
    from weights_converter.demo import randomize_batchnorm
    from weights_converter.pipeline import ConvertOptions, convert_and_verify

    print(
        f"{'variant':<28} {'max |logit diff|':>17} {'max rel':>9} {'top-1':>6} {'worst stage (abs)':>24}  reference"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            net = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=3)
            path = os.path.join(tmp, f"{name}.pth.tar")
            torch.save({"state_dict": net.state_dict()}, path)
            del net
            report = convert_and_verify(ConvertOptions(path))
            p = report.parity
            worst = max(p.stages[:-1], key=lambda s: s.max_abs)
            print(
                f"{name:<28} {p.max_abs:17.2e} {p.max_rel:9.2e} {p.top1_agreement:6.0%} "
                f"{worst.name + ' ' + format(worst.max_abs, '.1e'):>24}  {p.reference}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    cli.exit(main())
