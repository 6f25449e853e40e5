"""Images/s of `python -m convmixer_tf.predict` against a bare onnxruntime loop: the same
model_int8.onnx, the same JPEG files.

The model is a variant with random weights, exported to model_int8.onnx (calibrated on 8
synthetic images). The images are seeded JPEGs of smooth random colour fields, larger
than the input, so each needs the full evaluation transform (resize, centre crop).

- ours: the command line, classifying every image (its own figure: from the first image
  read to the last result printed, start-up and model loading apart; and its wall time);
- bare: what a user writes by hand, in this process: PIL decodes and resizes each image
  (bicubic, shorter side to size / crop_pct, centre crop), numpy normalises, one
  onnxruntime session runs batches of 32 with its default options.

The headline is ours / bare (images/s); the target is at least TARGET.

A second row times one image, as a user classifying one photo waits for it: the whole
`python -m convmixer_tf.predict` process against a whole bare process (a script that
imports onnxruntime and PIL, loads the same file and runs the same image through the same
transform), each the median of RUNS runs, in one run of this benchmark; the target is at
most ONE_IMAGE_TARGET times the bare process.

    python benchmarks/bench_predict.py [--variant convmixer_768_32] [--images 1000]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from convmixer_tf import cli  # noqa: E402
from convmixer_tf.config import list_variants  # noqa: E402

TARGET = 0.9  # ours / bare, images/s
ONE_IMAGE_TARGET = 1.5  # ours / bare, seconds of a whole process classifying one image
RUNS = 5
BATCH = 32

# The bare process of the one-image row: what a user writes by hand for one photo.
BARE_ONE = """
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

model, path, size, scale, raw = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
mean = np.array(sys.argv[6].split(","), np.float32)
std = np.array(sys.argv[7].split(","), np.float32)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
image = Image.open(path).convert("RGB")
w, h = image.size
w, h = (scale, int(h * scale / w)) if w <= h else (int(w * scale / h), scale)
image = image.resize((w, h), Image.BICUBIC)
left, top = round((w - size) / 2), round((h - size) / 2)
x = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
x = x if raw == "raw" else (x - mean) / std
print(int(np.argmax(session.run(None, {session.get_inputs()[0].name: x[None]})[0][0])))
"""


def write_images(folder, count: int, size=(320, 256), suffix: str = ".jpg", seed: int = 0) -> list:
    """`count` image files of smooth random colour fields (a 4 x 4 grid of colours, resized)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        paths.append(os.path.join(folder, f"{i:05d}{suffix}"))
        Image.fromarray(grid).resize(size, Image.BICUBIC).save(paths[-1])
    return paths


def export_files(variant: str, folder, formats) -> list:
    """The files of `formats` for `variant` with random weights (int8 calibrated on 8
    synthetic images), written to the new `folder`: their paths."""
    import convmixer_tf
    from convmixer_tf import export
    from convmixer_tf.export import registry

    model = convmixer_tf.create_model(variant)
    os.mkdir(folder)
    options = export.ExportOptions(formats=formats, calibration_count=8, processes=1)
    export.export_formats(model, folder, options)
    return [os.path.join(folder, registry.get(name).filename) for name in formats]


def ours(model: str, images_folder: str, count: int) -> dict:
    """The command line on every image: its own images/s figure, and its wall seconds."""
    command = [sys.executable, "-m", "convmixer_tf.predict", "--model", model, images_folder]
    command += ["--json"]
    start = time.perf_counter()
    done = cli.run_child(command)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the predict command failed: {done.stderr.strip()[-400:]}")
    lines = done.stdout.splitlines()
    if len(lines) != count:
        raise RuntimeError(f"the predict command printed {len(lines)} results for {count} images")
    found = re.search(r"classified (\d+) images in ([\d.]+) s \(([\d.]+) images/s\)", done.stderr)
    return {"images_per_s": float(found[3]), "wall_s": wall}


def bare(model: str, paths: list) -> dict:
    """A hand-written loop: PIL, numpy and one onnxruntime session."""
    import onnxruntime as ort
    from PIL import Image

    from convmixer_tf.export.onnx import read_facts

    info = read_facts(model)
    pre = info.preprocessing
    size = pre.input_size
    scale = int(np.floor(size / pre.crop_pct))
    mean, std = np.array(pre.mean, np.float32), np.array(pre.std, np.float32)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def load(path):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        w, h = (scale, round(h * scale / w)) if w <= h else (round(w * scale / h), scale)
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        x = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
        return x if info.raw_rgb else (x - mean) / std

    start = time.perf_counter()
    for i in range(0, len(paths), BATCH):
        session.run(None, {name: np.stack([load(p) for p in paths[i : i + BATCH]])})
    seconds = time.perf_counter() - start
    return {"images_per_s": len(paths) / seconds, "wall_s": seconds}


def one_image(model: str, path: str) -> dict:
    """Median wall seconds of RUNS whole processes classifying the image `path`: the predict
    command, and the bare script (BARE_ONE); each process's answer is checked."""
    from convmixer_tf.export.onnx import read_facts

    info = read_facts(model)
    pre = info.preprocessing
    scale = int(np.floor(pre.input_size / pre.crop_pct))
    raw = "raw" if info.raw_rgb else "normalised"
    commands = {
        "ours": [sys.executable, "-m", "convmixer_tf.predict", "--model", model, path, "--json"],
        "bare": [sys.executable, "-c", BARE_ONE, model, path, str(pre.input_size), str(scale), raw]
        + [",".join(map(str, pre.mean)), ",".join(map(str, pre.std))],
    }
    times = {name: [] for name in commands}
    for _ in range(RUNS):  # interleaved: a slow spell of the machine weighs on both
        for name, command in commands.items():
            start = time.perf_counter()
            done = cli.run_child(command)
            times[name].append(time.perf_counter() - start)
            if done.returncode != 0 or not done.stdout.strip():
                raise RuntimeError(f"{name} failed: {done.stderr.strip()[-400:]}")
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="python benchmarks/bench_predict.py",
        description="Images/s of the predict command against a bare onnxruntime loop.",
    )
    parser.add_argument("--variant", default="convmixer_768_32", choices=list_variants())
    parser.add_argument("--images", type=cli.positive(), default=1000, help="JPEG files classified")
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args, log))


def _run(args, log) -> int:
    with tempfile.TemporaryDirectory() as folder:
        images = os.path.join(folder, "images")
        os.mkdir(images)
        log(f"writing {args.images} JPEG files and {args.variant}'s model_int8.onnx ...")
        paths = write_images(images, args.images)
        [model] = export_files(args.variant, os.path.join(folder, "export"), ("onnx_int8",))
        log("the predict command ...")
        mine = ours(model, images, args.images)
        log("a bare onnxruntime loop ...")
        peer = bare(model, paths)
        log(f"one image, whole processes, median of {RUNS} ...")
        single = one_image(model, paths[0])
    ratio = mine["images_per_s"] / peer["images_per_s"]
    print(f"{args.variant} model_int8.onnx, {args.images} JPEG files ({os.cpu_count()} cores):")
    print(
        f"  python -m convmixer_tf.predict  {mine['images_per_s']:7.1f} images/s"
        f"  (whole command {mine['wall_s']:.1f} s, start-up and model loading included)"
    )
    print(f"  bare onnxruntime loop           {peer['images_per_s']:7.1f} images/s")
    verdict = "met" if ratio >= TARGET else "MISSED"
    print(f"  ours / bare: {ratio:.2f} (target >= {TARGET}: {verdict})")
    slower = single["ours"] / single["bare"]
    verdict = "met" if slower <= ONE_IMAGE_TARGET else "MISSED"
    print(f"one image, whole process (median of {RUNS}):")
    print(f"  python -m convmixer_tf.predict  {single['ours']:6.2f} s")
    print(f"  bare onnxruntime + PIL script   {single['bare']:6.2f} s")
    print(f"  ours / bare: {slower:.2f} (target <= {ONE_IMAGE_TARGET}: {verdict})")
    return 0


if __name__ == "__main__":
    cli.exit(main())
