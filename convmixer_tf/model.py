"""The functional ConvMixer builder.

Only stock Keras layers are used, so a saved `.keras` file loads with plain
`keras.models.load_model` and the model runs on every Keras 3 backend. Layer names
are deterministic (`stem_conv`, `block{i}_dw_conv`, ..., `head`) with `i` counted from
0 like timm's `blocks.{i}`, so the weight mapping reads at a glance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import keras

from convmixer_tf import contract
from convmixer_tf.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvMixerConfig,
    Preprocessing,
    get_variant,
)
from convmixer_tf.contract import HEAD, INPUT, POOLING_LAYERS, PREPROCESSING, block_layer

# PyTorch BatchNorm2d defaults. Keras' own (1e-3, 0.99) would change the numbers.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
POOLINGS = ("avg", "max", None)


def ConvMixer(
    dim: int = 768,
    depth: int = 32,
    kernel_size: int = 7,
    patch_size: int = 7,
    activation: str = "gelu",
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
) -> keras.Model:
    """Builds a ConvMixer-h/d as a functional Keras model (channels last).

    Args:
        dim, depth, kernel_size, patch_size, activation, num_classes, depthwise:
            the architecture, see `ConvMixerConfig`.
        input_shape: (H, W, 3); H and W may be None for any size. Default (None, None, 3).
        include_top: add global pooling and the `head` Dense layer.
        pooling: "avg" (what the released models use) or "max" before the head; with
            include_top=False, None returns the last feature map (N, H/p, W/p, dim).
        include_preprocessing: map raw 0-255 RGB to (x/255 - mean)/std inside the
            graph, so a deployed model takes raw pixels.
        mean, std: per-channel statistics for include_preprocessing.
        classifier_activation: None for logits (as timm), or e.g. "softmax".
        name: model name.

    Returns:
        A `keras.Model`.

    Example:
        >>> model = ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2,
        ...                   num_classes=10, input_shape=(32, 32, 3))
        >>> model.output_shape
        (None, 10)
    """
    config = ConvMixerConfig(
        dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size,
        activation=activation, num_classes=num_classes if include_top else 0, depthwise=depthwise,
    )
    if include_top and num_classes == 0:
        raise ValueError("num_classes=0 means no classifier head: pass include_top=False")
    input_shape = _check_input_shape(input_shape, patch_size)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if include_top and pooling is None:
        raise ValueError("pooling=None needs include_top=False: the head takes pooled features")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean!r}, std={std!r}")

    inputs = keras.Input(shape=input_shape, name=INPUT)
    x = inputs
    if include_preprocessing:
        x = _preprocessing_layer(mean, std)(x)
    x = build_features(x, config)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name=POOLING_LAYERS["avg"])(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name=POOLING_LAYERS["max"])(x)
    if include_top:
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name=HEAD)(x)
    model = keras.Model(inputs, x, name=name)
    size = input_shape[0] if input_shape[0] is not None and input_shape[0] == input_shape[1] else 224
    pre = Preprocessing(input_size=size, mean=tuple(mean), std=tuple(std))
    return contract.attach(model, contract.ModelInfo(config, pre))


def build_features(x, config: ConvMixerConfig):
    """Applies the stem and the `depth` mixer blocks of `config` to tensor `x`."""
    act = config.activation  # Activation("gelu") is the exact erf form.
    x = keras.layers.Conv2D(
        config.dim, config.patch_size, strides=config.patch_size, name=contract.STEM_CONV
    )(x)
    x = keras.layers.Activation(act, name=contract.STEM_ACT)(x)
    x = _batch_norm(contract.STEM_BN)(x)
    for i in range(config.depth):
        shortcut = x
        name = functools.partial(block_layer, i)
        if config.depthwise:
            spatial = keras.layers.DepthwiseConv2D(config.kernel_size, padding="same", name=name("dw_conv"))
        else:
            spatial = keras.layers.Conv2D(config.dim, config.kernel_size, padding="same", name=name("dw_conv"))
        x = spatial(x)
        x = keras.layers.Activation(act, name=name("dw_act"))(x)
        x = _batch_norm(name("dw_bn"))(x)
        x = keras.layers.Add(name=name("add"))([x, shortcut])
        x = keras.layers.Conv2D(config.dim, 1, name=name("pw_conv"))(x)
        x = keras.layers.Activation(act, name=name("pw_act"))(x)
        x = _batch_norm(name("pw_bn"))(x)
    return x


def create_model(name: str, **overrides) -> keras.Model:
    """Builds a named variant (see `list_variants()`), with any builder argument overridden.

    The input size defaults to the variant's training resolution (224 for ImageNet,
    32 for CIFAR-10) and include_preprocessing uses the variant's mean and std.

    Example:
        >>> model = create_model("convmixer_768_32", num_classes=10)
        >>> model.get_layer("stem_act").get_config()["activation"]
        'relu'
    """
    variant = get_variant(name)
    size = variant.preprocessing.input_size
    kwargs = dict(
        variant.config.to_dict(),
        input_shape=(size, size, 3),
        mean=variant.preprocessing.mean,
        std=variant.preprocessing.std,
        name=name,
    )
    kwargs.update(overrides)
    model = ConvMixer(**kwargs)
    info = contract.info_of(model)
    pre = variant.preprocessing
    if "mean" in overrides or "std" in overrides:
        pre = dataclasses.replace(pre, mean=tuple(kwargs["mean"]), std=tuple(kwargs["std"]))
    return contract.attach(model, info.replace(preprocessing=_sized(pre, model), variant=name))


def config_from_model(model: keras.Model) -> ConvMixerConfig:
    """The architecture of a ConvMixer built here (or loaded from a .keras file):
    stored with the model, or read from its layers for files saved before that was.
    num_classes is 0 for a model without a classifier head."""
    return contract.info_of(model).config


def _sized(pre: Preprocessing, model) -> Preprocessing:
    """`pre` at the model's input size, when the model has a fixed square one."""
    h, w = model.input_shape[1:3]
    return dataclasses.replace(pre, input_size=h) if h and h == w else pre


def _preprocessing_layer(mean, std):
    # (x/255 - mean)/std folded into one multiply-add per channel.
    return keras.layers.Rescaling(
        scale=[1.0 / (255.0 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)], name=PREPROCESSING,
    )


def _batch_norm(name: str):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _check_input_shape(input_shape, patch_size):
    if input_shape is None:
        return (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"input_shape must be (height, width, 3) in channels-last order, got {input_shape!r}"
        )
    for side in input_shape[:2]:
        if side is not None and (not isinstance(side, int) or side < patch_size):
            raise ValueError(
                f"patch_size={patch_size} is larger than the input {input_shape[:2]}; "
                f"each side must be None or an integer >= patch_size"
            )
    return input_shape


def rebuild(model: keras.Model, input_shape=None,
            preprocessing: Optional[Sequence[Sequence[float]]] = None) -> keras.Model:
    """The same network with another input size and/or the preprocessing layer added.

    Weights are copied layer by layer (by name), so the result is a flat ConvMixer
    graph like any other; what is stored with the model (class names, preprocessing)
    comes along.

    Args:
        model: a ConvMixer built by convmixer_tf.
        input_shape: new (H, W, 3); default the model's.
        preprocessing: (mean, std): make the result take raw 0-255 RGB. Ignored when
            `model` already has a preprocessing layer.

    Example:
        >>> app_model = rebuild(model, input_shape=(224, 224, 3),
        ...                     preprocessing=(IMAGENET_MEAN, IMAGENET_STD))  # doctest: +SKIP
    """
    info = contract.info_of(model)
    kwargs = {}
    own = contract.preprocessing_mean_std(model)
    if own is not None:
        kwargs = dict(include_preprocessing=True, **own)
    elif preprocessing is not None:
        mean, std = preprocessing
        kwargs = dict(include_preprocessing=True, mean=mean, std=std)
    layers = contract.layers_by_name(model)
    head = layers.get(HEAD)
    rebuilt = ConvMixer(
        **info.config.to_dict(), input_shape=input_shape or model.input_shape[1:], include_top=head is not None,
        pooling=contract.pooling_of(model), classifier_activation=head.get_config()["activation"] if head else None,
        name=model.name, **kwargs,
    )
    for layer in model.layers:
        if layer.weights:
            rebuilt.get_layer(layer.name).set_weights(layer.get_weights())
    pre = info.preprocessing
    if "mean" in kwargs:
        pre = dataclasses.replace(pre, mean=tuple(kwargs["mean"]), std=tuple(kwargs["std"]))
    return contract.attach(rebuilt, info.replace(preprocessing=_sized(pre, rebuilt)))


def with_preprocessing(model: keras.Model, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> keras.Model:
    """The same network taking raw 0-255 RGB (see `rebuild`)."""
    return rebuild(model, preprocessing=(mean, std))

