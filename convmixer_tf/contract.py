"""What a ConvMixer model is, in one place: the layer names every reader relies on, and
the facts that travel with the model (`ModelInfo`: architecture, how it was built,
preprocessing, class names, where its weights came from).

A model built here carries its facts (`info_of`); `save_model` stores them in the `.keras`
file as an extra member, `convmixer.json`, which plain `keras.models.load_model` ignores,
and `load_model` reads them back and checks them against the layers. Files saved by
earlier versions are read in one function, `_legacy_info`. No Keras import at import time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import unicodedata
import zipfile
from typing import Optional, Sequence, Tuple

import numpy as np

from convmixer_tf.config import VARIANTS, ConvMixerConfig, Preprocessing
from convmixer_tf.errors import BadInput, one_line

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


INFO_MEMBER = "convmixer.json"
HUB_SCHEME = "hf://"
INFO_VERSION = 2
POOLINGS = ("avg", "max", None)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a ConvMixer is, stored with it.

    Args:
        config: the architecture (num_classes 0: no classifier head).
        preprocessing: how its inputs are made (size, crop, interpolation, mean, std):
            what evaluation applies and exports write into their metadata.
        class_names: one name per output class, in output order, or None when unknown.
        variant: the released variant whose architecture (and weights) these are, if any.
        raw_rgb: the graph starts with the normalisation (a `preprocessing` layer with
            the preprocessing's mean and std) and takes raw RGB pixels.
        pooling: "avg", "max" or None (feature map out) before the head.
        classifier_activation: the head's activation (None: logits).
        source: where the weights came from (file, repo, revision, licence), or None.
    """

    config: ConvMixerConfig
    preprocessing: Preprocessing = Preprocessing()
    class_names: Optional[Tuple[str, ...]] = None
    variant: Optional[str] = None
    raw_rgb: bool = False
    pooling: Optional[str] = "avg"
    classifier_activation: Optional[str] = None
    source: Optional[dict] = None

    def __post_init__(self):
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
            check_class_names(self.class_names, self.config.num_classes)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def replace(self, **changes) -> "ModelInfo":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names) if self.class_names is not None else None
        return {"version": INFO_VERSION, **data}

    @classmethod
    def from_dict(cls, data) -> "ModelInfo":
        """The facts of a stored dict (this version's); ValueError naming a malformed field."""
        fields = {"config": (dict,), "preprocessing": (dict,), "class_names": (list, type(None)),
                  "variant": (str, type(None)), "raw_rgb": (bool,), "pooling": (str, type(None)),
                  "classifier_activation": (str, type(None)), "source": (dict, type(None))}
        for key, kinds in fields.items():
            if not isinstance(data.get(key), kinds):
                wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise BadInput(f"'{key}' must be {wanted}, got {json.dumps(data.get(key))[:60]}")
        try:
            pre = dict(data["preprocessing"], mean=tuple(data["preprocessing"]["mean"]),
                       std=tuple(data["preprocessing"]["std"]))
            return cls(**dict({k: data[k] for k in fields}, config=ConvMixerConfig(**data["config"]),
                              preprocessing=Preprocessing(**pre)))
        except (KeyError, TypeError) as err:
            raise BadInput(f"'config' or 'preprocessing' has missing or unknown fields ({err})") from None


_FORBIDDEN = ("Cc", "Zl", "Zp")  # control characters and line / paragraph separators


def _unprintable(name: str) -> Optional[str]:
    """Why `name` cannot be a single-line label ("is empty", "holds the control character
    U+XXXX"), or None."""
    bad = next((c for c in name if unicodedata.category(c) in _FORBIDDEN or c == "\ufeff"), None)
    return f"holds the control character U+{ord(bad):04X}" if bad else None if name.strip() else "is empty"


def check_class_names(names: Sequence[str], num_classes: int) -> None:
    """ValueError (exit 2) unless there is one non-empty, printable single-line name per class."""
    if num_classes == 0:
        raise BadInput("class names were given, but the model has no classifier head")
    if len(names) != num_classes:
        raise BadInput(f"{len(names)} class names for a model with {num_classes} classes")
    for i, name in enumerate(names):
        why = _unprintable(name)
        if why:
            raise BadInput(f"class name {i} ({name!r}) {why}: class names must be printable single lines")


def read_labels(path, allow_duplicates: bool = False) -> Tuple[str, ...]:
    """Class names from a text file, one per line ("\\n" or "\\r\\n"; a leading UTF-8 BOM
    and blank lines at the end are ignored). A control character, an empty line or,
    unless `allow_duplicates`, a repeated name is a ValueError naming the line."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise BadInput(f"cannot read labels file {path}: {reason}") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.removeprefix("\ufeff").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise BadInput(f"labels file {path} is empty")
    for number, line in enumerate(lines, 1):
        why = _unprintable(line)
        if why:
            raise BadInput(f"labels file {path}, line {number} {why} ({line!r}): one printable name per line")
    names = tuple(line.strip() for line in lines)
    repeated = {name: [i + 1 for i, n in enumerate(names) if n == name]
                for name, count in collections.Counter(names).items() if count > 1}
    if repeated and not allow_duplicates:
        shown = "; ".join(f"{name!r} on lines {', '.join(map(str, at))}" for name, at in list(repeated.items())[:3])
        raise BadInput(f"labels file {path} repeats names ({shown}): an app could not tell those classes "
                         "apart; pass --allow-duplicate-labels to keep them")
    return names


def imagenet_class_names(ids: bool = False) -> Optional[Tuple[str, ...]]:
    """ImageNet-1k class names in label order, from timm's offline table: the first words
    of the descriptions ("tench", "goldfish", ...), or with `ids` the WordNet ids tfds
    uses ("n01440764", ...); None when timm is not installed."""
    try:
        from timm.data import ImageNetInfo
    except Exception:  # timm missing, or torchvision broken beside this torch build
        return None
    info = ImageNetInfo()
    return tuple(info.label_names()) if ids else tuple(d.split(",")[0].strip() for d in info.label_descriptions())


def attach(model, info: ModelInfo):
    """Stores `info` on the in-memory `model` (and returns the model)."""
    model.convmixer_info = info
    return model


def info_of(model) -> ModelInfo:
    """The facts of `model`: those it carries, or, for a model loaded by plain Keras from a
    file without them, what an earlier version would have stored (`_legacy_info`)."""
    info = getattr(model, "convmixer_info", None)
    return info if isinstance(info, ModelInfo) else _legacy_info(model)


def _layer_facts(model) -> dict:
    """What the layers of a ConvMixer built here say about it."""
    layers = {layer.name: layer for layer in model.layers}
    try:
        stem, spatial = layers[STEM_CONV], layers[block_layer(0, "dw_conv")]
        activation = layers[STEM_ACT].get_config()["activation"]
    except KeyError as missing:
        raise BadInput(f"model {model.name!r} is not a ConvMixer built by convmixer_tf "
                         f"(it has no layer {missing})") from None
    head = layers.get(HEAD)
    config = ConvMixerConfig(
        dim=stem.filters, depth=sum(1 for name in layers if name.endswith("_pw_conv")),
        kernel_size=spatial.kernel_size[0], patch_size=stem.kernel_size[0], activation=activation,
        num_classes=head.units if head is not None else 0, depthwise=type(spatial).__name__ == "DepthwiseConv2D")
    norm = layers.get(PREPROCESSING)
    return {"config": config, "raw_rgb": norm is not None,
            "pooling": next((kind for kind, name in POOLING_LAYERS.items() if name in layers), None),
            "classifier_activation": head.get_config()["activation"] if head is not None else None,
            "normalisation": None if norm is None else Preprocessing.mean_std_of(
                np.ravel(np.asarray(norm.scale, np.float64)), np.ravel(np.asarray(norm.offset, np.float64)))}


def _legacy_info(model, stored: Optional[dict] = None) -> ModelInfo:
    """The facts of a model saved by an earlier version: its version-1 `stored` facts
    (config, preprocessing, class names, variant), or none at all, completed from its layers."""
    facts = _layer_facts(model)
    linear = facts["classifier_activation"] in (None, "linear")
    built = dict(raw_rgb=facts["raw_rgb"], pooling=facts["pooling"],
                 classifier_activation=None if linear else facts["classifier_activation"])
    if stored is not None:
        info = ModelInfo.from_dict(dict(stored, **built, source=None))
        return info if not facts["raw_rgb"] else info.replace(preprocessing=info.preprocessing.replace(
            **facts["normalisation"]))
    # No facts at all: a converted released model was named after its variant, whose
    # transform it needs; anything else gets ImageNet's.
    variant = model.name if model.name in VARIANTS else None
    pre = VARIANTS[variant].preprocessing if variant else Preprocessing()
    pre = pre.replace(**facts["normalisation"]) if facts["normalisation"] else pre
    size = model.input_shape[1]
    if size and model.input_shape[2] == size:
        pre = pre.replace(input_size=int(size))
    return ModelInfo(facts["config"], pre, None, variant, **built)


def _check_agrees(model, info: ModelInfo, path) -> None:
    """ValueError naming the file when its stored facts and its layers disagree."""
    facts = _layer_facts(model)
    found = {"architecture": facts["config"], "preprocessing layer": facts["raw_rgb"], "pooling": facts["pooling"]}
    stored = {"architecture": info.config, "preprocessing layer": info.raw_rgb, "pooling": info.pooling}
    wrong = [f"{key}: the layers say {found[key]}, {INFO_MEMBER} says {stored[key]}"
             for key in found if found[key] != stored[key]]
    if wrong:
        raise BadInput(f"{path}: its stored facts do not match its layers ({'; '.join(wrong)}); "
                         "the file was edited or is damaged")


def stored_info(path, model=None) -> Optional[ModelInfo]:
    """The ModelInfo inside a .keras file, or beside Keras' unzipped layout in a folder
    (`model`: the file's model, needed for files of an earlier version); None for a file
    saved without one."""
    try:
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, INFO_MEMBER)):
                return None
            with open(os.path.join(path, INFO_MEMBER)) as f:
                data = json.load(f)
        else:
            with zipfile.ZipFile(path) as archive:
                if INFO_MEMBER not in archive.namelist():
                    return None
                data = json.loads(archive.read(INFO_MEMBER))
        if not isinstance(data, dict) or data.get("version") not in (1, INFO_VERSION):
            raise BadInput(f"unsupported version {data.get('version') if isinstance(data, dict) else '?'}")
        return ModelInfo.from_dict(data) if data["version"] == INFO_VERSION else _legacy_info(model, data)
    except (zipfile.BadZipFile, ValueError) as err:  # ValueError: JSON, or a stored value out of range
        raise BadInput(f"{path}: cannot read {INFO_MEMBER}: {err}") from None


def save_model(model, path, info: Optional[ModelInfo] = None) -> str:
    """Saves `model` with its facts: as a .keras file with them inside, written atomically
    (a reader sees no file or the whole one), or, for `hf://OWNER/NAME`, as Keras' own Hub
    layout with them beside it and a model card, uploaded. Plain Keras loads either."""
    info = info or info_of(model)
    if str(path).startswith(HUB_SCHEME):
        from huggingface_hub import HfApi

        from convmixer_tf.temporaries import temporary_folder

        with temporary_folder() as folder:
            write_hub_folder(model, os.path.join(folder, "model"), info)
            repo = HfApi().create_repo(str(path)[len(HUB_SCHEME):], exist_ok=True).repo_id
            HfApi().upload_folder(repo_id=repo, folder_path=os.path.join(folder, "model"))
        return str(path)
    from convmixer_tf.temporaries import temporary_name

    path = os.fspath(path)
    tmp = temporary_name(path, suffix=".keras")  # Keras saves only to names ending in .keras
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(INFO_MEMBER, json.dumps(info.to_dict(), indent=2))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_hub_folder(model, folder, info: Optional[ModelInfo] = None) -> str:
    """Keras' unzipped layout of `model` in `folder` (what `model.save("hf://...")` uploads:
    config.json, metadata.json, model.weights.h5), its facts beside it, and a model card."""
    from convmixer_tf.card import model_card

    info = info or info_of(model)
    model.save(folder, zipped=False)
    with open(os.path.join(folder, INFO_MEMBER), "w") as f:
        json.dump(info.to_dict(), f, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(info))
    return folder


def _hub_folder(path) -> str:
    """The local folder of `hf://OWNER/NAME[@REVISION]`: downloaded, or from the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = path[len(HUB_SCHEME):].partition("@")
    try:
        folder = snapshot_download(repo, revision=revision or None)
    except LocalEntryNotFoundError:
        raise BadInput(f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                         f"cannot be reached; fetch it where it can: hf download {repo}") from None
    names = set(os.listdir(folder))
    if "model.keras" in names or {"config.json", "model.weights.h5"} <= names:
        return folder
    torch_weights = sorted(names & {"model.safetensors", "pytorch_model.bin"})
    if torch_weights:
        raise BadInput(f"{path} holds PyTorch weights ({torch_weights[0]}), not a Keras model: convert them "
                       f"with convmixer_tf.create_model(VARIANT, pretrained=\"hf-hub:{repo}\") or python -m "
                       f"weights_converter --torch-ckpt hf-hub:{repo}")
    raise BadInput(f"{path} holds no Keras model (neither model.keras nor Keras' config.json with model.weights.h5)")


def load_model(path, role: str = "model"):
    """Loads a ConvMixer with its facts attached: a .keras file, a folder in Keras' unzipped
    layout, or `hf://OWNER/NAME[@REVISION]` (either, from the Hub or its cache).
    ValueError (exit 2) naming the problem for a missing, truncated or foreign file.

    Example:
        >>> model = load_model("convmixer_768_32_keras/model.keras")   # doctest: +SKIP
        >>> info_of(model).class_names[:2]                             # doctest: +SKIP
        ('tench', 'goldfish')
    """
    import keras

    path = _hub_folder(str(path)) if str(path).startswith(HUB_SCHEME) else os.fspath(path)
    if os.path.isfile(os.path.join(path, "model.keras")):  # a converted output folder, as uploaded
        path = os.path.join(path, "model.keras")
    keras_folder = os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(path)
    if os.path.isdir(path) and not keras_folder:
        raise BadInput(f"{role} {path} is a folder, not a .keras file")
    if not os.path.exists(path):
        raise BadInput(f"{role} not found: {path}")
    if not keras_folder and not zipfile.is_zipfile(path):
        raise BadInput(f"cannot load {role} {path}: not a .keras file (a .keras file is a zip archive; "
                         "is it truncated or corrupt?)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any reason the file does not load
        raise BadInput(f"cannot load {role} {path}: {one_line(err)[:300]}") from None
    info = stored_info(path, model)
    if info is None:
        try:
            info = _legacy_info(model)
        except BadInput as err:  # a preprocessing layer of non-finite numbers, say
            raise BadInput(f"{path}: {err}") from None
    _check_agrees(model, info, path)
    return attach(model, info)
