"""The functional ConvMixer builder, the named variants, and the one way to derive a model
from another.

Only stock Keras layers are used, so a saved `.keras` file loads with plain
`keras.models.load_model` and the model runs on every Keras 3 backend. Layer names
are deterministic (`stem_conv`, `block{i}_dw_conv`, ..., `head`) with `i` counted from
0 like timm's `blocks.{i}`, so the weight mapping reads at a glance.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from convmixer_tf.config import (
    HEAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT,
    POOLING_LAYERS,
    PREPROCESSING,
    STEM_ACT,
    STEM_BN,
    STEM_CONV,
    ConvMixerConfig,
    Preprocessing,
    block_layer,
    get_variant,
)
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import Facts, attach, facts_of

# PyTorch BatchNorm2d defaults. Keras' own (1e-3, 0.99) would change the numbers.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def ConvMixer(
    dim: int = 768,
    depth: int = 32,
    kernel_size: int = 7,
    patch_size: int = 7,
    activation: str = "gelu",
    *,
    num_classes: int = 1000,
    input_shape: Optional[Sequence[Optional[int]]] = None,
    include_top: bool = True,
    pooling: Optional[str] = "avg",
    include_preprocessing: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    classifier_activation: Optional[str] = None,
    depthwise: bool = True,
    name: str = "convmixer",
):
    """Builds a ConvMixer-h/d as a functional Keras model (channels last).

    Args:
        dim, depth, kernel_size, patch_size, activation, num_classes, depthwise:
            the architecture, see `ConvMixerConfig`.
        input_shape: (H, W, 3); H and W may be None for any size. Default (None, None, 3).
        include_top: add global pooling and the `head` Dense layer.
        pooling: "avg" (what the released models use) or "max" before the head; with
            include_top=False, None returns the last feature map (N, H/p, W/p, dim).
        include_preprocessing: normalise raw RGB pixels with mean/std inside the graph
            (`Preprocessing.normalize`), so a deployed model takes raw pixels.
        mean, std: per-channel statistics of the normalisation.
        classifier_activation: None for logits (as timm), or e.g. "softmax".
        name: model name.

    Example:
        >>> model = ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2,
        ...                   num_classes=10, input_shape=(32, 32, 3))
        >>> model.output_shape
        (None, 10)
    """
    if include_top and num_classes == 0:
        raise BadInput("num_classes=0 means no classifier head: pass include_top=False")
    if include_top and pooling is None:
        raise BadInput("pooling=None needs include_top=False: the head takes pooled features")
    config = ConvMixerConfig(
        dim=dim,
        depth=depth,
        kernel_size=kernel_size,
        patch_size=patch_size,
        activation=activation,
        num_classes=num_classes if include_top else 0,
        depthwise=depthwise,
    )
    facts = Facts(
        config,
        Preprocessing(mean=tuple(mean), std=tuple(std)),
        raw_rgb=include_preprocessing,
        pooling=pooling,
        classifier_activation=classifier_activation if include_top else None,
    )
    return build(facts, input_shape, name=name)


def build(
    facts: Facts, input_shape=None, *, name: str = "convmixer", synchronized_bn: bool = False
):
    """The Keras model `facts` describes (fresh weights), under the current dtype policy.

    A mixed-precision policy keeps the head in float32 (softmax and loss in full precision).
    The preprocessing's input size follows a fixed square input shape.
    """
    import keras

    c = facts.config
    input_shape = _check_input_shape(input_shape, c.patch_size)
    inputs = keras.Input(shape=input_shape, name=INPUT)
    x = inputs
    if facts.raw_rgb:
        scale, offset = facts.preprocessing.scale_offset()
        x = keras.layers.Rescaling(scale=list(scale), offset=list(offset), name=PREPROCESSING)(x)
    x = keras.layers.Conv2D(c.dim, c.patch_size, strides=c.patch_size, name=STEM_CONV)(x)
    x = _activated(x, c.activation, (STEM_ACT, STEM_BN), synchronized=synchronized_bn)
    for i in range(c.depth):
        x = _block(x, i, c, synchronized=synchronized_bn)
    x = _head(x, facts)
    model = keras.Model(inputs, x, name=name)
    return attach(model, facts.replace(preprocessing=facts.preprocessing.for_input(input_shape)))


def _activated(x, activation: str, names, *, synchronized: bool):
    """The activation, then BatchNorm (PyTorch's epsilon and momentum); `names`: (act, bn)."""
    import keras

    # Activation("gelu") is the exact erf form.
    x = keras.layers.Activation(activation, name=names[0])(x)
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=names[1], synchronized=synchronized
    )(x)


def _block(x, i: int, c: ConvMixerConfig, *, synchronized: bool):
    """Mixer block `i`: a residual spatial (depthwise) convolution, then a 1x1 convolution."""
    import keras

    shortcut = x
    spatial = block_layer(i, "dw_conv")
    if c.depthwise:
        x = keras.layers.DepthwiseConv2D(c.kernel_size, padding="same", name=spatial)(x)
    else:
        x = keras.layers.Conv2D(c.dim, c.kernel_size, padding="same", name=spatial)(x)
    names = (block_layer(i, "dw_act"), block_layer(i, "dw_bn"))
    x = _activated(x, c.activation, names, synchronized=synchronized)
    x = keras.layers.Add(name=block_layer(i, "add"))([x, shortcut])
    x = keras.layers.Conv2D(c.dim, 1, name=block_layer(i, "pw_conv"))(x)
    names = (block_layer(i, "pw_act"), block_layer(i, "pw_bn"))
    return _activated(x, c.activation, names, synchronized=synchronized)


def _head(x, facts: Facts):
    """Global pooling (or none) and the classifier (or none); float32 under mixed precision."""
    import keras

    if facts.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name=POOLING_LAYERS["avg"])(x)
    elif facts.pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name=POOLING_LAYERS["max"])(x)
    if not facts.config.num_classes:
        return x
    mixed = keras.config.dtype_policy().name != "float32"
    head = keras.layers.Dense(
        facts.config.num_classes,
        activation=facts.classifier_activation,
        name=HEAD,
        dtype="float32" if mixed else None,
    )
    return head(x)


def build_variant(name: str, **overrides):
    """The Keras model of a named variant (see `list_variants()`), fresh weights, with any
    `ConvMixer` argument overridden.

    The input size defaults to the variant's training resolution (224 for ImageNet, 32 for
    CIFAR-10); the preprocessing is the variant's, with any mean and std given.

    Example:
        >>> model = build_variant("convmixer_768_32", num_classes=10)
        >>> model.get_layer("stem_act").get_config()["activation"]
        'relu'
    """
    variant = get_variant(name)
    pre = variant.preprocessing
    arguments = dict(
        variant.config.to_dict(),
        input_shape=(pre.input_size, pre.input_size, 3),
        mean=pre.mean,
        std=pre.std,
        name=name,
    )
    arguments.update(overrides)
    model = ConvMixer(**arguments)
    facts = facts_of(model)
    # the variant's transform
    kept = pre.replace(mean=facts.preprocessing.mean, std=facts.preprocessing.std)
    return attach(
        model, facts.replace(preprocessing=kept.for_input(model.input_shape[1:]), variant=name)
    )


def rebuild(
    model,
    input_shape=None,
    preprocessing=None,
    *,
    num_classes: Optional[int] = None,
    raw_rgb: Optional[bool] = None,
    dtype_policy: Optional[str] = None,
    synchronized_bn: bool = False,
):
    """The same network, changed: the one way to derive a model from another.

    Weights are copied layer by layer (by name) into a freshly built graph; what is stored
    with the model (class names, preprocessing, source) comes along.

    Args:
        model: a ConvMixer built by convmixer_tf.
        input_shape: new (H, W, 3); default the model's.
        preprocessing: a `Preprocessing`, or (mean, std), that replaces the stored one;
            given, the result takes raw RGB (a model that already does keeps its own
            mean and std).
        num_classes: a new head (freshly initialised) when it differs; the stored class
            names go with the old one.
        raw_rgb: True adds the normalisation layer (the stored mean and std), False drops it.
        dtype_policy: build under this Keras dtype policy ("float32" for an exportable copy
            of a mixed-precision model); the head of a mixed one computes in float32.
        synchronized_bn: BatchNorm statistics synchronised across replicas.

    Example:
        >>> app_model = rebuild(model, input_shape=(224, 224, 3),
        ...                     preprocessing=(IMAGENET_MEAN, IMAGENET_STD))  # doctest: +SKIP
    """
    facts = facts_of(model)
    if preprocessing is not None:
        if not isinstance(preprocessing, Preprocessing):
            mean, std = preprocessing
            preprocessing = facts.preprocessing.replace(mean=tuple(mean), std=tuple(std))
        if facts.raw_rgb:
            preprocessing = preprocessing.replace(
                mean=facts.preprocessing.mean, std=facts.preprocessing.std
            )
        facts = facts.replace(
            preprocessing=preprocessing, raw_rgb=True if raw_rgb is None else raw_rgb
        )
    elif raw_rgb is not None:
        facts = facts.replace(raw_rgb=raw_rgb)
    new_head = num_classes is not None and num_classes != facts.config.num_classes
    if new_head:
        facts = facts.replace(
            config=facts.config.replace(num_classes=num_classes), class_names=None
        )
    with _dtype_policy(dtype_policy):
        rebuilt = build(
            facts,
            input_shape or model.input_shape[1:],
            name=model.name,
            synchronized_bn=synchronized_bn,
        )
    old = {layer.name: layer for layer in model.layers}
    for layer in rebuilt.layers:
        if layer.weights and layer.name in old and not (new_head and layer.name == HEAD):
            layer.set_weights(old[layer.name].get_weights())
    return rebuilt


@contextlib.contextmanager
def _dtype_policy(name: Optional[str]):
    import keras

    previous = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_input_shape(input_shape, patch_size):
    if input_shape is None:
        return (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise BadInput(
            f"input_shape must be (height, width, 3) in channels-last order, got {input_shape!r}"
        )
    for side in input_shape[:2]:
        if side is not None and (not isinstance(side, int) or side < patch_size):
            raise BadInput(
                f"patch_size={patch_size} is larger than the input {input_shape[:2]}; "
                f"each side must be None or an integer >= patch_size"
            )
    return input_shape
