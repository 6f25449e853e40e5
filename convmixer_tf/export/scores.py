"""A file's class scores against Keras': the difference a float file may show, probabilities
from logits, and how the top classes agree image by image (ties included, which quantised
probabilities of an unsure model have)."""

from __future__ import annotations

import numpy as np


def allowed(tolerance: float, reference) -> float:
    """The largest abs difference from `reference` that passes: `tolerance` times its largest
    magnitude, or times 1 where that is smaller. Float32 rounding grows with the outputs'
    scale; a wrong network does not hide in it. Every float file, MediaPipe's scores and
    each stage of the converter's parity are judged by this rule."""
    reference = np.asarray(reference)
    largest = float(np.abs(reference).max()) if reference.size else 0.0
    return tolerance * max(1.0, largest)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def as_output(facts, computed: np.ndarray, output: str) -> np.ndarray:
    """A model's outputs `computed`, as probabilities when `output` asks for them and the
    model (its `facts`) gives logits."""
    linear = facts.config.num_classes and facts.classifier_activation in (None, "linear")
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
        return dict.fromkeys(("top1_agreement", "top1_tied", "top1_all_tied", "top1_among_best"))
    best = out == out.max(-1, keepdims=True)
    expected, sharing = reference.argmax(-1), best.sum(-1)  # how many classes share each top score
    ranked = sharing < best.shape[1]
    tied = sharing[ranked & (sharing > 1)]
    return {
        "top1_agreement": float(np.mean(out.argmax(-1) == expected)),
        "top1_tied": float(np.mean(sharing > 1)),
        "top1_all_tied": float(np.mean(~ranked)),
        "top1_among_best": float(np.mean(best[ranked, expected[ranked]])) if ranked.any() else None,
        "top1_best_classes": float(np.median(tied)) if tied.size else None,
        "classes": int(best.shape[1]),
    }
