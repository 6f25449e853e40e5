"""What a phone app sees of a TFLite file: MediaPipe Tasks' ImageClassifier (the C++ task
graph Android, iOS and web apps run) loads it and classifies images with it, and
TFLite's analyser says whether the GPU delegate can take it."""

from __future__ import annotations

import contextlib
import io
from typing import Optional

import numpy as np

from convmixer_tf.config import PIXEL_MAX
from convmixer_tf.errors import one_line
from convmixer_tf.export.scores import allowed

MEDIAPIPE_MISSING = "not installed (pip install 'convmixer-tf[mobile]')"


def gpu_compatibility(path) -> str:
    """ "compatible", or "incompatible: " and the analyser's first complaint, for TFLite's
    GPU delegate (tf.lite.experimental.Analyzer with gpu_compatibility=True)."""
    import tensorflow as tf

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path), gpu_compatibility=True)
    lines = printed.getvalue().splitlines()
    warnings = [line.strip() for line in lines if "GPU COMPATIBILITY WARNING" in line]
    if warnings:
        return "incompatible: " + warnings[0].split("WARNING:", 1)[-1].strip()
    return (
        "compatible"
        if any("looks compatible with GPU delegate" in line for line in lines)
        else "unknown: the analyser gave no verdict"
    )


def pixels(images: np.ndarray, facts) -> np.ndarray:
    """The uint8 RGB images an app would hand over, from a file's float inputs: raw RGB,
    or normalised ones (for a model whose `facts` say it does not take raw RGB)."""
    x = np.asarray(images, np.float64)
    if not facts.raw_rgb:
        x = facts.preprocessing.denormalize(x)
    return np.clip(np.round(x), 0, PIXEL_MAX).astype(np.uint8)


def open_classifier(path, num_classes: int, logits: bool = False):
    """MediaPipe's ImageClassifier for a .tflite file, every class in each result."""
    from mediapipe.tasks.python import BaseOptions, vision

    # logits may be negative: keep every class
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=str(path)),
        max_results=num_classes,
        score_threshold=-1e30 if logits else 0.0,
    )
    return vision.ImageClassifier.create_from_options(options)


def frame(image: np.ndarray):
    """A uint8 (H, W, 3) RGB array as MediaPipe's Image."""
    import mediapipe as mp

    return mp.Image(
        image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image, dtype=np.uint8)
    )


def classify(path, images: np.ndarray, num_classes: int, logits: bool = False):
    """Runs MediaPipe's ImageClassifier on uint8 images at the model's input size.

    Returns (scores [N, num_classes] by class index, category names by index).
    """
    with open_classifier(path, num_classes, logits) as classifier:
        return _classify_with(classifier, images, num_classes)


def _classify_with(classifier, images, num_classes):
    scores = np.full((len(images), num_classes), np.nan, np.float32)
    names = [""] * num_classes
    for i, image in enumerate(images):
        for category in classifier.classify(frame(image)).classifications[0].categories:
            scores[i, category.index] = category.score
            names[category.index] = category.category_name or ""
    return scores, names


def mediapipe_check(path, check, *, has_metadata: bool) -> dict:
    """Loads `path` in MediaPipe's ImageClassifier and compares what it gives with Keras.

    `check` (a `verify.Check`) holds the file's LiteRT runner, the Keras model, the
    held-out inputs, the tolerance and the model's facts. The images are the inputs as
    the uint8 pixels an app would pass, at the model's input size (MediaPipe's own
    resizing would blur the comparison). Float files must match Keras (softmaxed when the
    file gives probabilities) within the tolerance; a quantised file must give what
    LiteRT gives on the same file (one quantisation step) and reports its agreement
    with Keras. Category names must be the model's class names. Returns a dict for the
    report row; "problem" says why the check failed, if it did.
    """
    from convmixer_tf.export.scores import agreement, as_output

    skipped = _not_for_mediapipe(check.facts, has_metadata)
    if skipped is not None:
        return {"status": skipped}
    facts, runner = check.facts, check.runner
    images = pixels(check.inputs, facts)
    if facts.raw_rgb:
        fed = images.astype(np.float32)
    else:
        fed = facts.preprocessing.normalize(images).astype(np.float32)
    logits = check.shared(
        ("keras", "app pixels"), lambda: np.asarray(check.model.predict(fed, verbose=0))
    )
    reference = as_output(facts, logits, runner.output)
    try:
        classifier = open_classifier(path, reference.shape[1], runner.output == "logits")
    except (RuntimeError, ValueError) as err:  # MediaPipe refusing the file is the finding
        return {
            "status": "refused",
            "problem": f"MediaPipe refused the file: {one_line(err)[:300]}",
        }
    with classifier:
        scores, names = _classify_with(classifier, images, reference.shape[1])
    row = {
        "status": "ok",
        "images": int(len(images)),
        "max_abs": float(np.nanmax(np.abs(scores - reference))),
        **agreement(scores, reference),
        "labels": "none in the file" if not any(names) else "packed",
    }
    if check.tolerance is None:
        row["max_abs_vs_litert"] = float(np.max(np.abs(scores - runner(fed))))
    problems = _problems(row, scores, names, check, reference)
    if problems:
        row["problem"] = "MediaPipe: " + "; ".join(problems)
    return row


def _not_for_mediapipe(facts, has_metadata: bool) -> Optional[str]:
    """Why MediaPipe is not asked about this file (its status), or None."""
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return MEDIAPIPE_MISSING
    if not facts.config.num_classes:
        return "not for MediaPipe: the model gives features, not classes (an image classifier)"
    if not has_metadata:
        return "skipped: the file has no metadata (written before files carried it)"
    per_channel = any(
        len(set(values)) > 1 for values in (facts.preprocessing.mean, facts.preprocessing.std)
    )
    if not facts.raw_rgb and per_channel:
        # MediaPipe refuses "Per-channel image normalization"; the file is right for others.
        return (
            "not for MediaPipe: the file takes per-channel normalised input, which MediaPipe "
            "cannot give it (files that take raw RGB, the default, work there)"
        )
    return None


def _problems(row, scores, names, check, reference) -> list:
    problems = ["MediaPipe left classes without a score"] if np.isnan(scores).any() else []
    if check.tolerance is not None:
        limit = allowed(check.tolerance, reference)
        if row["max_abs"] > limit:
            problems.append(
                f"its scores differ from Keras by {row['max_abs']:.3g} (allowed {limit:.3g})"
            )
    elif row["max_abs_vs_litert"] > max(check.runner.output_step, 1e-6) * 1.01:
        problems.append(
            f"its scores differ from LiteRT's on the same file by {row['max_abs_vs_litert']:.3g}"
        )
    expected = check.facts.class_names
    if expected is not None and tuple(names) != tuple(expected):
        first = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
        problems.append(f"category {first} is named {names[first]!r}, expected {expected[first]!r}")
    return problems
