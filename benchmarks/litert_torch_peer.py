"""The litert-torch peer of bench_export.py: timm's ConvMixer converted by litert-torch.

Runs in its own virtual environment (litert-torch pins its own torch/jax stack), made by
benchmarks/setup_litert_torch.sh; bench_export.py calls it and times the file it writes
with the same LiteRT interpreter as ours.

    .venv-litert-torch/bin/python benchmarks/litert_torch_peer.py --variant convmixer_768_32 \\
        --state-dict weights.pth --output peer.tflite
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", required=True, help="timm model name, e.g. convmixer_768_32")
    parser.add_argument("--state-dict", required=True, help="timm state_dict saved with torch.save")
    parser.add_argument("--output", required=True, help=".tflite file to write")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)

    import litert_torch
    import timm
    import torch

    net = timm.create_model(args.variant, pretrained=False)
    net.load_state_dict(
        torch.load(args.state_dict, map_location="cpu", weights_only=True), strict=True
    )
    net.eval()
    sample = (torch.zeros(1, 3, args.image_size, args.image_size),)
    tmp = f"{args.output}.partial"
    start = time.perf_counter()
    litert_torch.convert(net, sample).export(tmp)
    seconds = time.perf_counter() - start
    os.replace(tmp, args.output)
    print(f"litert-torch {getattr(litert_torch, '__version__', '')}: wrote {args.output}")
    print(f"conversion seconds: {seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
