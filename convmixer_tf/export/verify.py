"""Loads an exported file in its own runtime and compares it with the Keras model."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np

from convmixer_tf import contract
from convmixer_tf.export import registry


def file_kind(path) -> str:
    """The registered format name of an exported file."""
    return registry.recognise(path).name


def __getattr__(name):
    if name == "TOLERANCES":  # float formats: the largest max-abs difference from Keras
        return {f.name: f.tolerance for f in registry.formats() if f.tolerance is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        """Median wall time of one single-image call, after one warm-up call."""
        image = np.asarray(image[:1], np.float32)
        self(image)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self(image)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def keras_outputs(model, inputs, output: str = "logits") -> np.ndarray:
    """What `model` computes on `inputs`, as `output` ("logits" or "probabilities")."""
    return as_output(model, np.asarray(model.predict(inputs, verbose=0, batch_size=8)), output)


def as_output(model, computed: np.ndarray, output: str) -> np.ndarray:
    """`model`'s outputs `computed`, turned into probabilities when `output` asks for them
    and the model's head gives logits."""
    head = contract.layers_by_name(model).get(contract.HEAD)
    linear = head is not None and head.get_config()["activation"] in (None, "linear")
    return softmax(computed) if output == "probabilities" and linear else computed


def verify(path, model, inputs: np.ndarray, tolerance: Optional[float] = None, name: Optional[str] = None,
           latency_runs: int = 10, threads: int = 2, reference: Optional[np.ndarray] = None, job=None) -> dict:
    """Runs `path` in its own runtime on `inputs` and compares with `model` (Keras).

    `inputs` are what the exported file takes (raw RGB when preprocessing is in its
    graph); `model` must take the same. A file that outputs probabilities is compared
    with the Keras logits after a softmax. For float files `passed` means max abs
    difference <= tolerance; quantised files (tolerance None) pass when they run and
    give finite outputs, and report their top-1 agreement with Keras.

    Args:
        name: the registered format (default: recognised from the file).
        reference: Keras' logits on `inputs`, when already computed.

    Returns a row: format, path, bytes, output, max_abs, max_rel, top1_agreement,
    tolerance, num_inputs, latency_ms, passed, plus what the format adds (its own checks:
    a "problem" there fails the row).
    """
    runner = Runner(path, threads, name if name in registry.names() else None)
    if reference is None:
        reference = keras_outputs(model, inputs)
    reference = as_output(model, reference, runner.output)
    out = runner(inputs)
    if out.shape != reference.shape:
        raise ValueError(f"{path}: output shape {out.shape} != Keras {reference.shape}")
    diff = np.abs(out.astype(np.float64) - reference)
    max_abs = float(diff.max())
    classes = reference.ndim == 2 and reference.shape[1] > 1
    top1 = float(np.mean(out.argmax(-1) == reference.argmax(-1))) if classes else None
    # Quantised probabilities of a near-uniform output (random weights, many classes) tie
    # at the top, where argmax picks the first class: the agreement then says little.
    tied = float(np.mean((out == out.max(-1, keepdims=True)).sum(-1) > 1)) if classes else None
    finite = bool(np.isfinite(out).all())
    check = Check(runner, model, np.asarray(inputs, np.float32), tolerance, job)
    row = {
        "format": name or runner.kind,
        "path": os.fspath(path),
        "bytes": _size(path),
        "output": runner.output,
        "max_abs": max_abs,
        "max_rel": max_abs / max(1e-12, float(np.abs(reference).max())),
        "top1_agreement": top1,
        "top1_tied": tied,
        "tolerance": tolerance,
        "num_inputs": int(len(inputs)),
        "latency_ms": runner.latency_ms(inputs, latency_runs) if latency_runs else None,
        "passed": finite and (tolerance is None or max_abs <= tolerance),
    }
    if runner.format.describe is not None:
        row.update(runner.format.describe(path, check))
    if row.get("problem"):
        row["passed"] = False
    return row


@dataclasses.dataclass
class Check:
    """What a format's own checks (its `describe`) get to see: the file's runner, the Keras
    model taking the file's inputs, the held-out inputs, the tolerance, the export job."""

    runner: Runner
    model: object
    inputs: np.ndarray
    tolerance: Optional[float]
    job: object = None

    @property
    def info(self):
        return self.job.info if self.job is not None else contract.info_of(self.model)

    @property
    def raw_rgb(self) -> bool:
        return self.job.raw_rgb if self.job is not None else contract.has_preprocessing(self.model)


def _size(path) -> int:
    path = os.fspath(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)
