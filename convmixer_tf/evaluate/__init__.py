"""Top-1 / top-5 accuracy and cross-entropy of a ConvMixer on a labelled dataset, with
timm's evaluation transform, so a converted ImageNet model scores as it does in timm.
`python -m convmixer_tf.evaluate` is the command line. Importing this loads no Keras."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from convmixer_tf.config import Preprocessing, get_variant
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import facts_of
from convmixer_tf.labels import imagenet_class_names


def preprocessing_for(model, preset: Optional[str] = None, **overrides) -> Preprocessing:
    """The evaluation transform for `model`: a variant's (by `preset`), else the one stored
    with the model; then `overrides` (input_size, crop_pct, interpolation, mean, std)
    where not None."""
    stored = facts_of(model).preprocessing
    base = stored if preset is None else get_variant(preset).preprocessing
    return base.replace(**{k: v for k, v in overrides.items() if v is not None})


def check_classes(model, class_names, allow_mismatch: bool = False) -> str:
    """Checks that the dataset's classes are the model's, in the same order; returns what
    was found, for the report. ValueError (exit 2) on a mismatch unless `allow_mismatch`.

    A model saved without class names (older files) is checked by class count only.
    """
    model_names = facts_of(model).class_names
    count = model.output_shape[-1]
    if len(class_names) != count:
        problem = f"the model has {count} classes, the dataset {len(class_names)}"
    elif model_names is None:
        return (
            f"the model stores no class names: the dataset's {count} classes are assumed to be "
            "its classes, in order"
        )
    elif _same_classes(model_names, class_names):
        return "the dataset's classes are the model's"
    else:
        problem = _difference(model_names, class_names)
    if not allow_mismatch:
        raise BadInput(f"class mismatch: {problem}; pass --allow-class-mismatch to score anyway")
    return f"class mismatch allowed: {problem}"


def _same_classes(model_names, data_names) -> bool:
    if tuple(model_names) == tuple(data_names):
        return True
    # tfds' imagenet2012 names its classes by WordNet id (n01440764), a model by word (tench).
    ids, words = imagenet_class_names(ids=True), imagenet_class_names()
    return ids is not None and tuple(data_names) == ids and tuple(model_names) == words


def _difference(model_names, data_names) -> str:
    """The first class that differs between two lists of names of the same length."""
    first = next(i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b)
    return (
        f"class {first} is {model_names[first]!r} in the model and {data_names[first]!r} in the dataset"
        + ("" if set(model_names) != set(data_names) else " (same names, another order)")
    )


def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Summed cross-entropy, top-1 and top-5 hits of one batch of logits (float64 math)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return {
        "loss_sum": float(-log_probs[np.arange(len(labels)), labels].sum()),
        "top1": int((top[:, 0] == labels).sum()),
        "top5": int((top == labels[:, None]).any(axis=1).sum()),
        "count": int(len(labels)),
    }


def evaluate(
    model,
    dataset,
    preprocessing: Optional[Preprocessing] = None,
    *,
    batch_size: int = 64,
    limit: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Scores `model` on an unbatched dataset of (uint8 image, int label) pairs.

    Images get timm's evaluation transform (`convmixer_tf.images.eval_transform`); a model
    with its own preprocessing layer is fed raw pixels, another one normalised ones.

    Returns:
        {"top1", "top5" (fractions), "loss" (mean cross-entropy), "count", "seconds"}.

    Example:
        >>> source = open_dataset(data_dir="val_images/")       # doctest: +SKIP
        >>> evaluate(model, source.train)["top1"]                # doctest: +SKIP
    """
    import keras

    from convmixer_tf.pipelines import eval_pipeline

    preprocessing = preprocessing or preprocessing_for(model)
    if limit is not None:
        dataset = dataset.take(limit)
    batches = eval_pipeline(
        dataset, preprocessing, batch_size, normalize=not facts_of(model).raw_rgb
    )
    num_classes = model.output_shape[-1]
    total = {"loss_sum": 0.0, "top1": 0, "top5": 0, "count": 0}
    started = time.perf_counter()
    for step, (images, labels) in enumerate(batches):
        labels = labels.numpy()
        if labels.size and labels.max() >= num_classes:
            raise BadInput(
                f"label {labels.max()} is out of range for a model with {num_classes} classes"
            )
        logits = keras.ops.convert_to_numpy(model(images, training=False))
        for key, value in scores(logits, labels).items():
            total[key] += value
        if step % 20 == 0:
            log(
                f"  {total['count']} images, top-1 so far {total['top1'] / max(total['count'], 1):.4f}"
            )
    if total["count"] == 0:
        raise BadInput("the evaluation set is empty")
    n = total["count"]
    return {
        "top1": total["top1"] / n,
        "top5": total["top5"] / n,
        "loss": total["loss_sum"] / n,
        "count": n,
        "seconds": round(time.perf_counter() - started, 2),
    }


def is_metrics(data) -> bool:
    """True for the JSON of an earlier metrics file of this command."""
    return isinstance(data, dict) and {"top1", "top5", "count"} <= set(data)
