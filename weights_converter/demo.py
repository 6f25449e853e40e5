"""Writes the demo checkpoint: convmixer_768_32 as the authors' code would save it.

The paper's nn.Sequential layout, seeded random weights and random BatchNorm running
statistics (fresh ones would hide a swapped mean/variance), in a dict under
`state_dict`. Random weights, not the released ones: nothing is downloaded.

    python -m weights_converter.demo demo/convmixer_768_32.pth
"""

from __future__ import annotations

import argparse
import os
import sys


def randomize_batchnorm(torch_model, seed: int = 0):
    """Non-trivial running statistics and affine terms for every BatchNorm2d."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.num_batches_tracked.fill_(1000)
    return torch_model


def write_demo_checkpoint(path, variant: str = "convmixer_768_32", seed: int = 0) -> str:
    import torch

    from convmixer_tf.config import get_variant
    from weights_converter.parity import paper_convmixer

    cfg = get_variant(variant).config
    torch.manual_seed(seed)
    model = paper_convmixer(
        cfg.dim,
        cfg.depth,
        cfg.kernel_size,
        cfg.patch_size,
        cfg.num_classes,
        activation=cfg.activation,
        depthwise=cfg.depthwise,
    )
    randomize_batchnorm(model, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    torch.save({"state_dict": model.state_dict(), "epoch": 0, "arch": variant}, tmp)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_converter.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="where to write the .pth file")
    parser.add_argument("--variant", default="convmixer_768_32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_demo_checkpoint(args.path, args.variant, args.seed)
    print(
        f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB): {args.variant}, paper nn.Sequential layout, "
        f"random weights and BatchNorm statistics (seed {args.seed})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
