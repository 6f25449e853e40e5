"""Milliseconds per image of the web page (python -m convmixer_tf.web) in Chromium, against
MediaPipe's Python ImageClassifier on the same file: the same C++ task graph, built to
WebAssembly in the page and native in Python, both on the CPU.

For each .tflite file: the page is served by the command, opened in Chromium (Debian's,
headless), and classifies RUNS images chosen as a user chooses them (the file input);
the figure is the median of the page's own timing of `classify()` after one warm-up.
MediaPipe in Python times `classify()` on the same images the same way.

    python benchmarks/bench_web.py [--variant convmixer_768_32] [--model FILE.tflite ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402
from bench_predict import export_files, write_images  # noqa: E402

from convmixer_tf import cli  # noqa: E402
from convmixer_tf.config import list_variants  # noqa: E402

RUNS = 10


def in_chromium(model: str, images: list, runs: int) -> float:
    """The page's median ms per classify() of `model`, after one warm-up."""
    from playwright.sync_api import sync_playwright

    command = [sys.executable, "-m", "convmixer_tf.web", "--model", model, "--port", "0"]
    with cli.child(command, stdout=subprocess.PIPE, text=True) as server:
        address = server.stdout.readline().strip()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page()
            page.goto(address)
            _until(page, "window.convmixer.ready || window.convmixer.error", 300)
            times = []
            for i in range(runs + 1):
                page.evaluate("window.convmixer.lastResult = null")
                page.set_input_files("#file", images[i % len(images)])
                times.append(_until(page, "window.convmixer.lastResult", 300)["ms"])
            browser.close()
        server.terminate()
    return float(np.median(times[1:]))


def in_python(model: str, images: list, runs: int) -> float:
    """MediaPipe's Python ImageClassifier: median ms per classify(), after one warm-up."""
    from PIL import Image

    from convmixer_tf.export import mobile

    with mobile.open_classifier(model, 5) as classifier:
        frames = [mobile.frame(np.asarray(Image.open(p).convert("RGB"))) for p in images]
        times = []
        for i in range(runs + 1):
            start = time.perf_counter()
            classifier.classify(frames[i % len(frames)])
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[1:]))


def _until(page, expression, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"the page did not answer {expression} in {timeout} s")


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="python benchmarks/bench_web.py",
        description="ms per image of the web page in Chromium against MediaPipe in Python.",
    )
    parser.add_argument("--variant", default="convmixer_768_32", choices=list_variants())
    parser.add_argument("--model", nargs="+", help=".tflite files (default: the variant's two)")
    parser.add_argument("--runs", type=cli.positive(), default=RUNS, help="timed images per file")
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args, log))


def _run(args, log) -> int:
    from convmixer_tf.export.metadata import packed_facts

    with tempfile.TemporaryDirectory() as folder:
        models = args.model
        if not models:
            log(f"exporting {args.variant}'s model.tflite and model_int8.tflite ...")
            formats = ("tflite", "tflite_int8")
            models = export_files(args.variant, os.path.join(folder, "export"), formats)
        print(f"ms per image, median of {args.runs} ({os.cpu_count()} cores, CPU):")
        for model in models:
            size = packed_facts(model).preprocessing.input_size
            images = write_images(folder, 2, (size, size), ".png")
            log(f"{model} in Chromium and in Python ...")
            web, native = in_chromium(model, images, args.runs), in_python(model, images, args.runs)
            name = os.path.basename(model)
            print(
                f"  {name:20s} Chromium {web:8.1f}  MediaPipe Python {native:8.1f}  ({web / native:.1f}x)"
            )
    return 0


if __name__ == "__main__":
    cli.exit(main())
