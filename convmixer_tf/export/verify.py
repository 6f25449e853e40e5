"""Loads an exported file in its own runtime and compares it with the Keras model."""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

# Float files must match Keras this closely (max abs difference of the outputs).
TOLERANCES = {"saved_model": 1e-4, "onnx": 1e-4, "tflite": 1e-4, "tflite_float16": 1e-2}


def file_kind(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return "saved_model"
    if path.endswith(".tflite"):
        return "tflite"
    if path.endswith(".onnx"):
        return "onnx"
    raise ValueError(f"cannot tell the format of {path}: expected a SavedModel directory, .tflite or .onnx")


class Runner:
    """Runs one exported file on NHWC float32 batches (raw or normalised, as exported)."""

    def __init__(self, path, threads: int = 2):
        self.path, self.kind = os.fspath(path), file_kind(path)
        if self.kind == "saved_model":
            import tensorflow as tf

            self._fn = tf.saved_model.load(self.path).signatures["serving_default"]
        elif self.kind == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            inp = self._session.get_inputs()[0]
            self._nchw = len(inp.shape) == 4 and inp.shape[1] == 3 and inp.shape[3] != 3
        else:
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_path=self.path, num_threads=threads)
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if self.kind == "saved_model":
            return self._fn(images=images)["logits"].numpy()
        if self.kind == "onnx":
            x = images.transpose(0, 3, 1, 2) if self._nchw else images
            return self._session.run(["logits"], {"images": np.ascontiguousarray(x)})[0]
        batch = int(self._input["shape"][0])
        return np.concatenate([self._run_tflite(images[i:i + batch]) for i in range(0, len(images), batch)])

    def _run_tflite(self, x):
        dtype = self._input["dtype"]
        if dtype != np.float32:  # quantised input: q = x / scale + zero_point
            scale, zero = self._input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output["index"])
        if self._output["dtype"] != np.float32:
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

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


def verify(path, model, inputs: np.ndarray, tolerance: Optional[float] = None, name: Optional[str] = None,
           latency_runs: int = 10, threads: int = 2, reference: Optional[np.ndarray] = None) -> dict:
    """Runs `path` in its own runtime on `inputs` and compares with `model` (Keras).

    `inputs` are what the exported file takes (raw RGB when preprocessing is in its
    graph); `model` must take the same. For float files `passed` means max abs
    difference <= tolerance; quantised files (tolerance None) pass when they run and
    give finite outputs, and report their top-1 agreement with Keras.

    Returns a row: format, path, bytes, max_abs, max_rel, top1_agreement,
    latency_ms, passed.
    """
    runner = Runner(path, threads)
    if reference is None:
        reference = np.asarray(model.predict(inputs, verbose=0, batch_size=8))
    out = runner(inputs)
    if out.shape != reference.shape:
        raise ValueError(f"{path}: output shape {out.shape} != Keras {reference.shape}")
    diff = np.abs(out.astype(np.float64) - reference)
    max_abs = float(diff.max())
    top1 = float(np.mean(out.argmax(-1) == reference.argmax(-1))) if reference.ndim == 2 and reference.shape[1] > 1 else None
    finite = bool(np.isfinite(out).all())
    passed = finite and (tolerance is None or max_abs <= tolerance)
    return {
        "format": name or runner.kind,
        "path": os.fspath(path),
        "bytes": _size(path),
        "max_abs": max_abs,
        "max_rel": max_abs / max(1e-12, float(np.abs(reference).max())),
        "top1_agreement": top1,
        "tolerance": tolerance,
        "num_inputs": int(len(inputs)),
        "latency_ms": runner.latency_ms(inputs, latency_runs) if latency_runs else None,
        "passed": passed,
    }


def _size(path) -> int:
    path = os.fspath(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)
