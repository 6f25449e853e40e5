"""Classify images with any file this project writes: `model.keras`, `saved_model/`, each
`.tflite`, each `.onnx`, or a converted folder. Every file describes itself (its facts:
the preprocessing and the class names, `contract.facts_json`), so a file copied alone to
another machine still gives names. Images are decoded and transformed (timm's eval
transform, `images.eval_transform`) ahead of the model on a few threads, and batched.
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

from convmixer_tf.contract import info_of
from convmixer_tf.errors import BadInput
from convmixer_tf.images import IMAGE_EXTENSIONS

BATCH_SIZE = 32
TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Result:
    """What the model says of one image: its `top` (name, probability) pairs, best first,
    or why the image could not be read (`error`)."""

    image: str
    top: tuple = ()
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "top": [{"name": name, "score": score} for name, score in self.top],
        }


class Classifier:
    """A model file, read as it describes itself: its facts (`info`: preprocessing, class
    names) and a runner in its own runtime (Keras, TensorFlow, LiteRT, onnxruntime).

    Example:
        >>> classifier = Classifier("out/model_int8.onnx")  # doctest: +SKIP
        >>> [result.top[0] for result in classify(classifier, ["cat.jpg"])]  # doctest: +SKIP
        [('tabby', 0.91)]
    """

    def __init__(self, path, threads: int = 2):
        self.path = model_file(path)
        self._keras = None
        self._runner = None
        if self.path.endswith(".keras"):
            from convmixer_tf.saving import load_model

            self._keras = load_model(self.path)
            self.info = info_of(self._keras)
            self.kind = "keras"
        else:
            self._open_export(threads)
        names = self.info.class_names
        self.names = (
            tuple(names)
            if names
            else tuple(f"class {i}" for i in range(self.info.config.num_classes))
        )

    def _open_export(self, threads: int):
        from convmixer_tf.export import registry
        from convmixer_tf.export.verify import Runner

        fmt = registry.recognise(self.path)
        self.info = fmt.facts(self.path) if fmt.facts else None
        if self.info is None:
            raise BadInput(
                f"{self.path} does not describe itself (it was written before files carried their facts); "
                "export it again with this version"
            )
        self._runner = Runner(self.path, threads, name=fmt.name)
        self.kind = fmt.name

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of transformed images (`load`)."""
        from convmixer_tf.export.scores import as_output

        if self._keras is not None:
            return as_output(
                self.info, np.asarray(self._keras.predict(images, verbose=0)), "probabilities"
            )
        out = self._runner(images)
        if self._runner.output == "logits":
            out = as_output(self.info, out, "probabilities")
        return out

    def load(self, path) -> np.ndarray:
        """The image in file `path` as this model takes it (timm's eval transform of its
        preprocessing; normalised when the model does not take raw RGB); BadInput (a
        one-line reason) when the file does not decode."""
        from convmixer_tf.images import decoded, eval_transform

        image = decoded(path)
        if isinstance(image, str):
            raise BadInput(image)
        return np.asarray(
            eval_transform(image, self.info.preprocessing, normalize=not self.info.raw_rgb)
        )

    def top(self, probabilities: np.ndarray, k: int = TOP_K) -> tuple:
        best = np.argsort(-probabilities, kind="stable")[:k]
        return tuple((self.names[i], float(probabilities[i])) for i in best)


def model_file(path) -> str:
    """The model file at `path`: the file itself, a SavedModel folder, or a converted folder's
    model.keras; BadInput for anything else."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith((".keras", ".tflite", ".onnx")):
        return path
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isfile(os.path.join(path, "model.keras")):
        return os.path.join(path, "model.keras")
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith((".tflite", ".onnx")))
        if found:
            raise BadInput(
                f"{path} holds several model files ({', '.join(found)}); name the one to use"
            )
    if not os.path.exists(path):
        raise BadInput(f"model not found: {path}")
    raise BadInput(
        f"{path} is not a model file this project writes (.keras, .tflite, .onnx or a SavedModel)"
    )


def find_images(paths: Iterable) -> List[str]:
    """The image files named, and those in the folders named (recursively, sorted), in the
    order given; BadInput for a path that does not exist or a folder without images."""
    from convmixer_tf.images import list_images

    found = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found += list_images(path)
        elif os.path.isfile(path):
            found.append(path)
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
    two batches ahead of the model, and classified `batch_size` at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=loaders) as pool:
        loaded = _ahead(pool, classifier.load, paths, 2 * batch_size)
        while True:
            batch = list(itertools.islice(loaded, batch_size))
            if not batch:
                return
            good = [(path, image) for path, image in batch if not isinstance(image, BadInput)]
            scores = (
                classifier.probabilities(np.stack([image for _, image in good])) if good else []
            )
            tops = {path: classifier.top(p, top_k) for (path, _), p in zip(good, scores)}
            for path, image in batch:
                if isinstance(image, BadInput):
                    yield Result(path, error=str(image))
                else:
                    yield Result(path, tops[path])


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
