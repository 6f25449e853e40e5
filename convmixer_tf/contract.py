"""What a ConvMixer model is, in one place: the layer names every reader relies on, and
the facts that travel with the model (architecture, preprocessing, class names).

The facts are a `ModelInfo`. A model built here carries one (`info_of(model)`), and
`save_model` stores it inside the `.keras` file as an extra member, `convmixer.json`,
beside Keras' own: plain `keras.models.load_model` still loads the file (it reads only
its own members), and `load_model` here reads the facts back. Files saved before this
existed are read from their layers, so they keep working.

Nothing here imports Keras: it only looks at models it is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Optional, Sequence, Tuple

from convmixer_tf.config import VARIANTS, ConvMixerConfig, Preprocessing

# --------------------------------------------------------------------------------------
# Layer names (a mapping table, a parity probe or an exporter finds layers by these)

INPUT = "images"
PREPROCESSING = "preprocessing"
STEM_CONV, STEM_ACT, STEM_BN = "stem_conv", "stem_act", "stem_bn"
POOLING_LAYERS = {"avg": "avg_pool", "max": "max_pool"}
HEAD = "head"
BLOCK_PARTS = ("dw_conv", "dw_act", "dw_bn", "add", "pw_conv", "pw_act", "pw_bn")


def block_layer(i: int, part: str) -> str:
    """The name of part `part` (one of BLOCK_PARTS) of mixer block `i` (from 0, like timm)."""
    if part not in BLOCK_PARTS:
        raise ValueError(f"part must be one of {BLOCK_PARTS}, got {part!r}")
    return f"block{i}_{part}"


def stage_layers(depth: int) -> list:
    """The layers whose outputs are the network's stages: the stem and each block."""
    return [STEM_BN] + [block_layer(i, "pw_bn") for i in range(depth)]


def layers_by_name(model) -> dict:
    return {layer.name: layer for layer in model.layers}


def pooling_of(model) -> Optional[str]:
    names = layers_by_name(model)
    return next((kind for kind, name in POOLING_LAYERS.items() if name in names), None)


def has_head(model) -> bool:
    return HEAD in layers_by_name(model)


def has_preprocessing(model) -> bool:
    return PREPROCESSING in layers_by_name(model)


def preprocessing_mean_std(model) -> Optional[dict]:
    """{"mean", "std"} of the model's preprocessing layer (x/255 - mean)/std, or None."""
    import numpy as np

    layer = layers_by_name(model).get(PREPROCESSING)
    if layer is None:
        return None
    scale = np.asarray(layer.scale, np.float64).reshape(-1)
    offset = np.asarray(layer.offset, np.float64).reshape(-1)
    std = 1.0 / (255.0 * scale)
    return dict(mean=tuple(float(v) for v in -offset * std), std=tuple(float(v) for v in std))


# --------------------------------------------------------------------------------------
# The facts stored with a model

INFO_MEMBER = "convmixer.json"
INFO_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a ConvMixer is, stored with it.

    Args:
        config: the architecture (num_classes 0: no classifier head).
        preprocessing: how its inputs are made (size, crop, interpolation, mean, std):
            what evaluation applies and exports write into their metadata.
        class_names: one name per output class, in output order, or None when unknown.
        variant: the released variant whose weights these are, if any.
    """

    config: ConvMixerConfig
    preprocessing: Preprocessing = Preprocessing()
    class_names: Optional[Tuple[str, ...]] = None
    variant: Optional[str] = None

    def __post_init__(self):
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            object.__setattr__(self, "class_names", names)
            check_class_names(names, self.config.num_classes)

    def replace(self, **changes) -> "ModelInfo":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"version": INFO_VERSION, "config": self.config.to_dict(),
                "preprocessing": dataclasses.asdict(self.preprocessing),
                "class_names": list(self.class_names) if self.class_names is not None else None,
                "variant": self.variant}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        if not isinstance(data, dict) or data.get("version") != INFO_VERSION:
            version = data.get("version") if isinstance(data, dict) else "?"
            raise ValueError(f"unsupported {INFO_MEMBER} (version {version})")
        pre = dict(data["preprocessing"])
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        names = data.get("class_names")
        return cls(ConvMixerConfig(**data["config"]), Preprocessing(**pre),
                   tuple(names) if names is not None else None, data.get("variant"))


def check_class_names(names: Sequence[str], num_classes: int) -> None:
    """ValueError (exit 2) unless there is one non-empty, single-line name per class."""
    if num_classes == 0:
        raise ValueError("class names were given, but the model has no classifier head")
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
    bad = next((n for n in names if not n.strip() or "\n" in n or "\r" in n), None)
    if bad is not None:
        raise ValueError(f"class names must be non-empty single lines, got {bad!r}")


def read_labels(path) -> Tuple[str, ...]:
    """Class names from a text file, one per line (blank lines at the end are ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise ValueError(f"cannot read labels file {path}: {reason}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"labels file {path} is empty")
    return tuple(line.strip() for line in lines)


def imagenet_class_names() -> Optional[Tuple[str, ...]]:
    """ImageNet-1k class names in label order ("tench", "goldfish", ...): the first words
    of timm's offline copy of the descriptions; None when timm is not installed."""
    info = _imagenet_info()
    return None if info is None else tuple(d.split(",")[0].strip() for d in info.label_descriptions())


def imagenet_class_ids() -> Optional[Tuple[str, ...]]:
    """ImageNet-1k WordNet ids in label order ("n01440764", ...), as tfds names them."""
    info = _imagenet_info()
    return None if info is None else tuple(info.label_names())


def _imagenet_info():
    try:
        from timm.data import ImageNetInfo
    except Exception:  # timm missing, or torchvision broken beside this torch build
        return None
    return ImageNetInfo()


def attach(model, info: ModelInfo):
    """Stores `info` on the in-memory `model` (and returns the model)."""
    model.convmixer_info = info
    return model


def info_of(model) -> ModelInfo:
    """The facts of `model`: the ones stored with it, or, for a model saved before they
    were, what its layers tell (architecture, mean/std of its preprocessing layer)."""
    info = getattr(model, "convmixer_info", None)
    return info if isinstance(info, ModelInfo) else _info_from_layers(model)


def _info_from_layers(model) -> ModelInfo:
    layers = layers_by_name(model)
    try:
        stem, spatial = layers[STEM_CONV], layers[block_layer(0, "dw_conv")]
        activation = layers[STEM_ACT].get_config()["activation"]
    except KeyError as missing:
        raise ValueError(f"model {model.name!r} is not a ConvMixer built by convmixer_tf "
                         f"(it has no layer {missing})") from None
    head = layers.get(HEAD)
    config = ConvMixerConfig(
        dim=stem.filters, depth=sum(1 for name in layers if name.endswith("_pw_conv")),
        kernel_size=spatial.kernel_size[0], patch_size=stem.kernel_size[0], activation=activation,
        num_classes=head.units if head is not None else 0, depthwise=type(spatial).__name__ == "DepthwiseConv2D")
    # Files saved before the facts were stored: a converted released model was named after
    # its variant, whose transform it needs; anything else gets ImageNet's.
    variant = model.name if model.name in VARIANTS else None
    pre = VARIANTS[variant].preprocessing if variant else Preprocessing()
    mean_std = preprocessing_mean_std(model)
    if mean_std:
        pre = dataclasses.replace(pre, **mean_std)
    size = model.input_shape[1]
    if size and model.input_shape[2] == size:
        pre = dataclasses.replace(pre, input_size=int(size))
    return ModelInfo(config, pre, None, variant)


def stored_info(path) -> Optional[ModelInfo]:
    """The ModelInfo inside a .keras file, or None for a file saved without one."""
    try:
        with zipfile.ZipFile(path) as archive:
            if INFO_MEMBER not in archive.namelist():
                return None
            return ModelInfo.from_dict(json.loads(archive.read(INFO_MEMBER)))
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot read {INFO_MEMBER}: {err}") from None


def save_model(model, path, info: Optional[ModelInfo] = None) -> str:
    """Saves `model` as a .keras file with its ModelInfo inside, atomically (a reader
    sees no file or the whole one). Plain `keras.models.load_model` loads it."""
    info = info or info_of(model)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.partial.keras")
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(INFO_MEMBER, json.dumps(info.to_dict(), indent=2))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_model(path, role: str = "model"):
    """Loads a .keras ConvMixer with its facts attached; ValueError (exit 2) naming the
    problem for a missing, truncated or foreign file.

    Example:
        >>> model = load_model("convmixer_768_32_keras/model.keras")   # doctest: +SKIP
        >>> info_of(model).class_names[:2]                             # doctest: +SKIP
        ('tench', 'goldfish')
    """
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{role} not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot load {role} {path}: not a .keras file (a .keras file is a zip archive; "
                         "is it truncated or corrupt?)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any reason the file does not load
        raise ValueError(f"cannot load {role} {path}: {' '.join(str(err).split())[:300]}") from None
    info = stored_info(path)
    attach(model, info if info is not None else _info_from_layers(model))
    return model
