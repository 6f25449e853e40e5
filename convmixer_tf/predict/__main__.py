"""python -m convmixer_tf.predict: classify images with any file this project writes
(the job: convmixer_tf.predict).

    python -m convmixer_tf.predict --model converted/model.keras photo.jpg
    python -m convmixer_tf.predict --model out/model_int8.onnx photos/ --top-k 3 --json

Exit status: 0 every image classified, 1 some images could not be read or scored (each
named on stderr; the others are classified), 2 bad arguments or model, 3 internal error,
130/143 interrupted, 141 stdout closed by its reader (`| head`).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time

from convmixer_tf import cli, errors
from convmixer_tf.predict import BATCH_SIZE, TOP_K

EPILOG = """\
The model is any file this project writes: model.keras (or the folder the converter
wrote), saved_model/, model.tflite and the other .tflite files, model.onnx or
model_int8.onnx. Each carries its facts: the preprocessing (input size, crop, mean and
std) and the class names, so a file copied alone to another machine still gives names.
Images are files or folders (searched recursively); each gets timm's evaluation
transform. Scores are probabilities.

--json prints one JSON object per image on stdout:
  {"image": PATH, "top": [{"name": NAME, "score": PROBABILITY}, ...]}
A PATH that is not UTF-8 is shown as `ls -b` shows it (\\xff for the byte 0xff, \\\\ for
a backslash), and "image_base64" beside it holds its bytes.
"""


def build_parser():
    p = cli.ArgumentParser(
        prog="python -m convmixer_tf.predict",
        description="Classify images with a ConvMixer file: model.keras, a SavedModel, a .tflite or an "
        ".onnx file written by this project.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--model", required=True, metavar="FILE", help="a model file, or a converted folder"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument(
        "--top-k", type=cli.positive(), default=TOP_K, metavar="K", help="classes shown per image"
    )
    p.add_argument(
        "--batch-size", type=cli.positive(), default=BATCH_SIZE, metavar="N", help="images per call"
    )
    p.add_console_options(noisy="TensorFlow, LiteRT, onnxruntime and absl")
    return p


def main(argv=None) -> int:
    return cli.run_parsed(build_parser(), argv, _predict)


def _predict(args, log, console) -> int:
    from tqdm import tqdm

    from convmixer_tf.predict import Classifier, classify, find_images

    paths = find_images(args.images)
    classifier = Classifier(args.model)
    log(
        f"{cli.escaped(classifier.path)} ({classifier.kind}): "
        f"{classifier.facts.config.num_classes} classes, "
        f"{classifier.facts.preprocessing.input_size} px; {len(paths)} images"
    )
    failed = 0
    started = time.perf_counter()
    bar = tqdm(
        total=len(paths),
        file=console,
        unit="image",
        disable=True if args.quiet else None,
        leave=False,
    )
    with bar:
        for result in classify(classifier, paths, top_k=args.top_k, batch_size=args.batch_size):
            bar.update(1)
            if result.error is not None:
                failed += 1
                _above(bar, f"warning: {cli.escaped(result.image)}: {result.error}", console)
            else:
                _above(bar, _shown(result, args.json), sys.stdout)
    seconds = time.perf_counter() - started
    log(
        f"classified {len(paths) - failed} images in {seconds:.1f} s ({len(paths) / seconds:.1f} images/s)"
    )
    if failed:
        raise errors.CheckFailed(
            f"{failed} of {len(paths)} images could not be classified (named above)"
        )
    return errors.EXIT_OK


def _above(bar, line: str, stream) -> None:
    """Prints `line` on `stream` above the progress bar: the bar leaves the terminal first and
    comes back after, whichever of stdout and stderr each is on (tqdm's own `write` clears
    only the bars on the stream it writes to, so a result on stdout landed behind the bar)."""
    bar.clear()
    try:
        print(line, file=stream, flush=True)
    finally:
        bar.refresh()


def _shown(result, as_json: bool) -> str:
    if as_json:  # ASCII, every control character escaped; no NaN (strict parsers refuse it)
        return json.dumps(_json(result), allow_nan=False)
    rows = [f"  {score:7.2%}  {name}" for name, score in result.top]
    return "\n".join([cli.escaped(result.image), *rows])


def _json(result) -> dict:
    """The JSON object of `result`. A name that is not UTF-8 (the file system's bytes, held
    in a str as lone surrogates, which are not Unicode: strict parsers refuse them) is the
    text `ls -b` shows (`\\xff`), with its bytes in base64 as `image_base64`."""
    fields = result.to_dict()
    try:
        result.image.encode("utf-8")
    except UnicodeEncodeError:
        fields["image"] = cli.escaped(result.image)
        fields["image_base64"] = base64.b64encode(os.fsencode(result.image)).decode("ascii")
    return fields


if __name__ == "__main__":
    cli.exit(main())
