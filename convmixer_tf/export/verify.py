"""Loads an exported file in its own runtime and compares it with the Keras model; writes
the files of a run one format after the other, each checked so."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Callable, Optional

import numpy as np

from convmixer_tf.export import registry
from convmixer_tf.export.base import ExportError, ExportFormat, ExportJob
from convmixer_tf.export.scores import agreement, allowed, as_output
from convmixer_tf.facts import Facts, facts_of


class Runner:
    """Runs one exported file on NHWC float32 batches (raw or normalised, as exported).

    Attributes:
        kind: its format name; output: "logits" or "probabilities"; output_step: the
            value of one step of a quantised output (0 for a float one).
    """

    def __init__(self, path, threads: int = 2, *, fmt: Optional[ExportFormat] = None):
        self.path = os.fspath(path)
        self.format = fmt or registry.find(self.path)[1]
        self.kind = self.format.name
        self._run = self.format.load(self.path, threads)
        self.output = getattr(self._run, "output", "logits")
        self.output_step = getattr(self._run, "output_step", 0.0)  # a quantised output's step

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(images, np.float32))

    def latency_ms(self, image: np.ndarray, runs: int = 10) -> float:
        """Median wall time of one single-image call, after one warm-up call: up to `runs`
        calls, fewer once three agree within 10% (the figure is then stable)."""
        image = np.asarray(image[:1], np.float32)
        self(image)
        times = []
        while len(times) < runs and not (
            len(times) >= 3 and np.ptp(times[-3:]) <= 0.1 * np.median(times[-3:])
        ):
            start = time.perf_counter()
            self(image)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)


@dataclasses.dataclass(frozen=True)
class Check:
    """One file's check: its runner, the Keras model taking the file's inputs (and carrying
    the facts, `facts`), the held-out inputs, the tolerance (None for a quantised file), and
    `shared(key, make)`: `make()` once for all the files of a run (what a format's own
    checks, its `describe`, compute alike)."""

    runner: Runner
    model: object
    inputs: np.ndarray
    tolerance: Optional[float]
    shared: Callable = lambda key, make: make()

    @property
    def facts(self) -> Facts:
        return facts_of(self.model)


def verify(path, model, inputs: np.ndarray, *, tolerance: Optional[float] = None) -> dict:
    """Runs `path` in its own runtime on `inputs` and compares it with `model` (Keras).

    `inputs` are what the exported file takes (raw RGB when preprocessing is in its
    graph); `model` must take the same. A file that outputs probabilities is compared
    with the Keras logits after a softmax. A float file passes when its max abs
    difference is within `tolerance` times the largest reference output (or 1, if that
    is smaller): float32 rounding grows with the outputs' scale, a wrong network does
    not hide in it. A quantised file (tolerance None) passes when it runs and gives
    finite outputs; its row reports how it agrees with Keras (`scores.agreement`).

    Returns a row: format, path, bytes, output, max_abs, max_rel, the agreement figures,
    tolerance, allowed, num_inputs, passed, plus what the format adds (its own checks: a
    "problem" there fails the row).

    Example:
        >>> verify("out/model.onnx", model, images, tolerance=1e-4)["passed"]  # doctest: +SKIP
        True
    """
    inputs = np.asarray(inputs, np.float32)
    check = Check(Runner(path), model, inputs, tolerance)
    return compare(check, np.asarray(model.predict(inputs, verbose=0, batch_size=8)))


def compare(check: Check, reference: np.ndarray) -> dict:
    """The row of `verify` for a check whose Keras outputs (`reference`, logits) are known."""
    runner, tolerance = check.runner, check.tolerance
    reference = as_output(check.facts, reference, runner.output)
    out = runner(check.inputs)
    if out.shape != reference.shape:
        raise RuntimeError(f"{runner.path}: output shape {out.shape} != Keras {reference.shape}")
    max_abs = float(np.abs(out.astype(np.float64) - reference).max())
    scale = float(np.abs(reference).max())
    limit = None if tolerance is None else allowed(tolerance, reference)
    row = {
        "format": runner.kind,
        "path": runner.path,
        "bytes": _size(runner.path),
        "output": runner.output,
        "max_abs": max_abs,
        "max_rel": max_abs / max(1e-12, scale),
        **agreement(out, reference),
        "tolerance": tolerance,
        "allowed": limit,
        "num_inputs": int(len(check.inputs)),
        "latency_ms": None,
        "passed": bool(np.isfinite(out).all()) and (limit is None or max_abs <= limit),
    }
    if runner.format.describe is not None:
        row.update(runner.format.describe(runner.path, check))
    if row.get("problem"):
        row["passed"] = False
    return row


def write_and_check(formats, job: ExportJob, directory, held_out, reference, *, log) -> dict:
    """{name: (row, its runner)} of each format, written into `directory` and checked in turn
    on `held_out` against Keras' outputs on them (`reference`, logits); its latency is
    timed by the caller, when nothing else runs. ExportError at the first that fails."""
    done = {}
    for fmt in formats:
        path = os.path.join(os.fspath(directory), fmt.filename)
        log(f"  {fmt.name} -> {fmt.filename}")
        start = time.perf_counter()
        fmt.write(job, path)
        runner = Runner(path, fmt=fmt)
        row = compare(Check(runner, job.model, held_out, fmt.tolerance, job.shared), reference)
        if row.get("problem"):
            raise ExportError(f"{fmt.name}: {fmt.filename}: {row['problem']}")
        if not row["passed"]:
            raise ExportError(
                f"{fmt.name}: {fmt.filename} differs from Keras by {row['max_abs']:.3g} (allowed "
                f"{row['allowed']:.3g}: tolerance {row['tolerance']} x the largest output, at least 1)"
            )
        done[fmt.name] = (dict(row, seconds=time.perf_counter() - start), runner)
    return done


def _size(path) -> int:
    """The bytes of a file, or of every file in a folder (a SavedModel)."""
    files = [pathlib.Path(path), *pathlib.Path(path).rglob("*")]
    return sum(file.stat().st_size for file in files if file.is_file())
