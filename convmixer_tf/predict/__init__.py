"""Classify images with any file this project writes: `model.keras`, `saved_model/`, each
`.tflite`, each `.onnx`, or a converted folder. Every file describes itself (its facts:
the preprocessing and the class names, `Facts.to_json`), so a file copied alone to
another machine still gives names. Images are decoded and transformed (timm's eval
transform, `images.eval_transform`) ahead of the model on a few threads, and batched.
A file is opened and checked by `export.model_file.open_model` before any image is read.
`python -m convmixer_tf.predict` is the command line. Importing this loads no TensorFlow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from typing import Iterable, Iterator, List, Optional

import numpy as np

from convmixer_tf.errors import BadInput
from convmixer_tf.images import IMAGE_EXTENSIONS, list_images, load_image

BATCH_SIZE = 32
TOP_K = 5
# About the most memory the images loaded ahead of the model take (bytes): at 224 px (602 KB
# an image) many batches of 32; at 4096 px, the largest input a file may have (201 MB an
# image), two images.
LOADED_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class Result:
    """What the model says of one image: its `top` (name, probability) pairs, best first,
    or why it has none (`error`: the image could not be read, or the model gave no finite
    scores for it)."""

    image: str
    top: tuple = ()
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "top": [{"name": name, "score": score} for name, score in self.top],
        }


class Classifier:
    """A model file, read as it describes itself and checked against its graph
    (`export.model_file.open_model`): its `facts` (preprocessing, class names) and a
    runner in its own runtime (Keras, TensorFlow, LiteRT, onnxruntime).

    Example:
        >>> classifier = Classifier("out/model_int8.onnx")  # doctest: +SKIP
        >>> [result.top[0] for result in classify(classifier, ["cat.jpg"])]  # doctest: +SKIP
        [('tabby', 0.91)]
    """

    def __init__(self, path, threads: int = 2):
        from convmixer_tf.export.model_file import open_model

        self.model = open_model(path, threads=threads)
        self.path = self.model.path
        self.kind = self.model.kind
        self.facts = self.model.facts
        self.names = self.model.class_names

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of transformed images (`load`)."""
        return self.model.probabilities(images)

    def load(self, path) -> np.ndarray:
        """The image in file `path` as this model takes it (timm's eval transform of its
        preprocessing; normalised when the model does not take raw RGB); BadInput (a
        one-line reason) when the file does not decode."""
        return load_image(path, self.facts.preprocessing, normalize=not self.facts.raw_rgb)

    def top(self, probabilities: np.ndarray, k: int = TOP_K) -> tuple:
        """The `k` best (name, probability) pairs (all of them, when there are fewer)."""
        best = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
        return tuple((self.names[i], float(probabilities[i])) for i in best)


def find_images(paths: Iterable) -> List[str]:
    """The image files named, and those in the folders named (recursively, sorted), in the
    order given; BadInput for a path that does not exist or is not a regular file or
    folder, or a folder without images."""
    found = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found += list_images(path)
        elif os.path.isfile(path):
            found.append(path)
        elif os.path.lexists(path):
            raise BadInput(f"image {path} is not a regular file or a folder")
        else:
            raise BadInput(f"image not found: {path}")
    if not found:
        raise BadInput(f"no images ({', '.join(IMAGE_EXTENSIONS)}) given")
    return found


def classify(
    classifier: Classifier,
    paths,
    *,
    top_k: int = TOP_K,
    batch_size: int = BATCH_SIZE,
    loaders: int = 2,
) -> Iterator[Result]:
    """The `Result` of each image file, in order: images are loaded by `loaders` threads up to
    two batches ahead of the model (fewer when they are large: LOADED_BYTES), and
    classified `batch_size` at a time. An image whose scores are not all finite numbers
    (NaN, infinity) gets an error, not a classification."""
    size = classifier.facts.preprocessing.input_size
    ahead = max(1, min(2 * batch_size, LOADED_BYTES // (size * size * 3 * 4)))
    batch_size = min(batch_size, ahead)
    with concurrent.futures.ThreadPoolExecutor(max_workers=loaders) as pool:
        loaded = _ahead(pool, classifier.load, paths, ahead)
        while True:
            batch = list(itertools.islice(loaded, batch_size))
            if not batch:
                return
            yield from _classified(classifier, batch, top_k)


def _classified(classifier: Classifier, batch, top_k: int) -> Iterator[Result]:
    """The results of one batch of (path, loaded image or its BadInput)."""
    good = [image for _, image in batch if not isinstance(image, BadInput)]
    rows = iter(classifier.probabilities(np.stack(good)) if good else [])
    for path, image in batch:
        if isinstance(image, BadInput):
            yield Result(path, error=f"cannot read image: {image}")
            continue
        row = next(rows)
        if np.isfinite(row).all():
            yield Result(path, classifier.top(row, top_k))
        else:
            yield Result(path, error="no scores: the model gave NaN or infinity for it")


def _ahead(pool, load, paths, count: int):
    """(path, loaded image or its BadInput) of each path, in order, `count` loads ahead."""
    pending = collections.deque()
    for path in paths:
        pending.append((path, pool.submit(load, path)))
        if len(pending) > count:
            yield _done(*pending.popleft())
    while pending:
        yield _done(*pending.popleft())


def _done(path, future):
    try:
        return path, future.result()
    except BadInput as err:
        return path, err
