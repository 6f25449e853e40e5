"""Loads an exported file in its own runtime and compares it with the Keras model."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np

from convmixer_tf import contract
from convmixer_tf.export import registry


class Runner:
    """Runs one exported file on NHWC float32 batches (raw or normalised, as exported).

    Attributes:
        kind: its format name; output: "logits" or "probabilities".
    """

    def __init__(self, path, threads: int = 2, name: Optional[str] = None):
        self.path = os.fspath(path)
        self.format = registry.get(name) if name is not None else registry.recognise(self.path)
        self.kind = self.format.name
        self._run = self.format.load(self.path, threads)
        self.output = getattr(self._run, "output", "logits")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(images, np.float32))

    def latency_ms(self, image: np.ndarray, runs: int = 10) -> float:
        """Median wall time of one single-image call, after one warm-up call: up to `runs`
        calls, fewer once three agree within 10% (the figure is then stable)."""
        image = np.asarray(image[:1], np.float32)
        self(image)
        times = []
        while len(times) < runs and not (len(times) >= 3 and np.ptp(times[-3:]) <= 0.1 * np.median(times[-3:])):
            start = time.perf_counter()
            self(image)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def as_output(info, computed: np.ndarray, output: str) -> np.ndarray:
    """A model's outputs `computed`, as probabilities when `output` asks for them and the
    model (facts `info`) gives logits."""
    linear = info.config.num_classes and info.classifier_activation in (None, "linear")
    return softmax(computed) if output == "probabilities" and linear else computed


def agreement(out: np.ndarray, reference: np.ndarray) -> dict:
    """How a file's class scores `out` agree with Keras' `reference`, image by image.

    top1_agreement: the same top class (the first, where several tie); top1_tied: the
    share of images whose top score several classes share (quantised probabilities of
    an unsure model); top1_all_tied: the share where every class has the same score
    (nothing to compare); top1_among_best: over the other images, Keras' top class is
    one of the file's best-scoring classes, the figure that still means something when
    scores tie (None when every image is all tied); top1_best_classes: over the images
    with ties, the median number of classes sharing the top score (what "among" weighs).
    """
    if reference.ndim != 2 or reference.shape[1] < 2:
        return {"top1_agreement": None, "top1_tied": None, "top1_all_tied": None, "top1_among_best": None}
    best = out == out.max(-1, keepdims=True)
    expected, sharing = reference.argmax(-1), best.sum(-1)  # how many classes share each top score
    ranked = sharing < best.shape[1]
    tied = sharing[ranked & (sharing > 1)]
    return {"top1_agreement": float(np.mean(out.argmax(-1) == expected)),
            "top1_tied": float(np.mean(sharing > 1)), "top1_all_tied": float(np.mean(~ranked)),
            "top1_among_best": float(np.mean(best[ranked, expected[ranked]])) if ranked.any() else None,
            "top1_best_classes": float(np.median(tied)) if tied.size else None, "classes": int(best.shape[1])}


@dataclasses.dataclass
class Check:
    """What a format's own checks (its `describe`) get to see: the file's runner, the Keras
    model taking the file's inputs, the held-out inputs, the tolerance, the model's facts,
    and `shared(key, make)`: `make()` once for all the files of a run."""

    runner: Runner
    model: object
    inputs: np.ndarray
    tolerance: Optional[float]
    info: object
    shared: Callable


def verify(path, model, inputs: np.ndarray, *, tolerance: Optional[float] = None, name: Optional[str] = None,
           latency_runs: int = 10, threads: int = 2, reference: Optional[np.ndarray] = None, info=None,
           shared: Optional[Callable] = None, runner: Optional[Runner] = None) -> dict:
    """Runs `path` in its own runtime on `inputs` and compares with `model` (Keras).

    `inputs` are what the exported file takes (raw RGB when preprocessing is in its
    graph); `model` must take the same. A file that outputs probabilities is compared
    with the Keras logits after a softmax. A float file passes when its max abs
    difference is within `tolerance` times the largest reference output (or 1, if that
    is smaller): float32 rounding grows with the outputs' scale, a wrong network does
    not hide in it. A quantised file (tolerance None) passes when it runs and gives
    finite outputs; its row reports how it agrees with Keras (`agreement`).

    Args:
        name: the registered format (default: recognised from the file).
        reference: Keras' logits on `inputs`, when already computed.
        info: the model's facts, when the caller holds them.
        shared: a run's `ExportJob.shared`, for what several files' checks compute alike.
        runner: the file's `Runner`, when the caller holds one.

    Returns a row: format, path, bytes, output, max_abs, max_rel, the agreement figures,
    tolerance, allowed, num_inputs, latency_ms, passed, plus what the format adds (its
    own checks: a "problem" there fails the row).
    """
    info = info or contract.info_of(model)
    runner = runner or Runner(path, threads, name if name in registry.names() else None)
    if reference is None:
        reference = np.asarray(model.predict(inputs, verbose=0, batch_size=8))
    reference = as_output(info, reference, runner.output)
    out = runner(inputs)
    if out.shape != reference.shape:
        raise ValueError(f"{path}: output shape {out.shape} != Keras {reference.shape}")
    max_abs = float(np.abs(out.astype(np.float64) - reference).max())
    scale = float(np.abs(reference).max())
    allowed = None if tolerance is None else tolerance * max(1.0, scale)
    row = {"format": name or runner.kind, "path": os.fspath(path), "bytes": _size(path), "output": runner.output,
           "max_abs": max_abs, "max_rel": max_abs / max(1e-12, scale), **agreement(out, reference),
           "tolerance": tolerance, "allowed": allowed, "num_inputs": int(len(inputs)),
           "latency_ms": runner.latency_ms(inputs, latency_runs) if latency_runs else None,
           "passed": bool(np.isfinite(out).all()) and (allowed is None or max_abs <= allowed)}
    if runner.format.describe is not None:
        row.update(runner.format.describe(path, Check(runner, model, np.asarray(inputs, np.float32), tolerance, info,
                                                      shared or (lambda key, make: make()))))
    if row.get("problem"):
        row["passed"] = False
    return row


def _size(path) -> int:
    path = os.fspath(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)
