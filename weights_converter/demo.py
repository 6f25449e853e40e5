"""`make demo`: the main job on a built-in default, with a real answer where one can be had.

Where the Hugging Face Hub (or its cache) holds timm's released convmixer_768_32, those
weights are converted with parity, exported, and the photo shipped in the repository is
classified. Offline, a seeded random checkpoint of the same network, in the paper's
nn.Sequential layout, takes their place, and the demo says its answers mean nothing.

    python -m weights_converter.demo --output demo
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from convmixer_tf import cli
from convmixer_tf.config import get_variant
from convmixer_tf.errors import EXIT_BAD_INPUT, BadInput
from weights_converter import hub

VARIANT = "convmixer_768_32"
RELEASED = hub.PREFIX + get_variant(VARIANT).hub_id
OFFLINE = "offline: random weights; the answers below mean nothing"
# Chelsea the cat, from scikit-image's sample data (CC0, by Stefan van der Walt):
# docs/photos/README.md says where it comes from.
PHOTO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "photos", "chelsea.jpg")


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


def write_demo_checkpoint(path, variant: str = VARIANT, seed: int = 0) -> str:
    """`variant` as the authors' code would save it: the paper's nn.Sequential layout, seeded
    random weights and random BatchNorm running statistics (fresh ones would hide a swapped
    mean/variance), in a dict under `state_dict`."""
    import torch

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


def _say(line: str) -> None:
    print(line, flush=True)  # at once, before the minutes of work that follow


def released_or_seeded(folder, say=_say) -> str:
    """What the demo converts: the released weights' Hub id when the Hub or its cache has
    them (online, this downloads them into the cache), else a seeded checkpoint written
    into `folder`, saying so in one line."""
    try:
        hub.resolve(RELEASED)
    except hub.NotReachable:
        say(OFFLINE)
        return _nearby(write_demo_checkpoint(os.path.join(folder, f"{VARIANT}.pth")))
    say(f"the released weights: {RELEASED} ({get_variant(VARIANT).description})")
    return RELEASED


def _nearby(path) -> str:
    """`path` relative to the working folder when it lies below it (as in the repository,
    where `make demo` runs), else as it is."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _run(command) -> int:
    print(f"$ {cli.escaped(shlex.join(['python', *command[1:]]))}", flush=True)
    return subprocess.run(command).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_converter.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default="demo", metavar="DIR", help="where it all goes")
    parser.add_argument("--export", nargs="+", default=["all"], metavar="FORMAT")
    args = parser.parse_args(argv)
    try:
        checkpoint = released_or_seeded(args.output)
    except (BadInput, OSError) as err:
        print(f"error: {cli.escaped(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = _nearby(os.path.join(args.output, f"{VARIANT}_keras"))
    convert = [sys.executable, "-m", "weights_converter", "--torch-ckpt", checkpoint]
    convert += ["--variant", VARIANT, "--output", out, "--export", *args.export]
    code = _run([*convert, "--calibration-count", "8", "--force"])
    return code or _try_it(out)


def _try_it(out) -> int:
    """Classifies the shipped photo with a converted file, and says how to try others."""
    model = os.path.join(out, "model.onnx")
    if not os.path.isfile(model):
        model = os.path.join(out, "model.keras")
    code = 0
    if os.path.isfile(PHOTO):
        code = _run(
            [sys.executable, "-m", "convmixer_tf.predict", "--model", model, _nearby(PHOTO)]
        )
    print("Try it (docs/try-it.md): classify your images with any file written, or open the")
    print("phone's file in a browser:")
    print(f"  python -m convmixer_tf.predict --model {cli.escaped(shlex.quote(model))} IMAGES...")
    phone = os.path.join(out, "model_int8.tflite")
    if os.path.isfile(phone):
        print(f"  python -m convmixer_tf.web --model {cli.escaped(shlex.quote(phone))}")
    return code


if __name__ == "__main__":
    sys.exit(main())
