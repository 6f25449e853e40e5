"""What a ConvMixer model is, in one place: the layer names every reader relies on, and
the facts that travel with the model (`ModelInfo`: architecture, how it was built,
preprocessing, class names, where its weights came from).

A model built here carries its facts (`info_of`); `saving` stores them in and reads them
from files. A model that carries none (loaded by plain Keras, or from a file saved before
facts were stored) is described from its layers by one function, `legacy_info`. No Keras
import at import time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
import zlib
from typing import Optional, Tuple

import numpy as np

from convmixer_tf.config import VARIANTS, ConvMixerConfig, Preprocessing
from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.labels import check_class_names, check_text

# Layer names (a mapping table, a parity probe or an exporter finds layers by these)
INPUT = "images"
PREPROCESSING = "preprocessing"
STEM_CONV = "stem_conv"
STEM_ACT = "stem_act"
STEM_BN = "stem_bn"
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
INFO_VERSION = 2
POOLINGS = ("avg", "max", None)
# The most a file's facts may take (bytes) and the deepest their JSON may nest: the facts of
# a model with 21,841 long class names take about 1 MB, and nest three levels.
FACTS_LIMIT = 4 * 2**20
NESTING_LIMIT = 16


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
            raise BadInput(f"pooling must be one of {POOLINGS}, got {self.pooling!r:.40}")
        for field in ("variant", "classifier_activation"):
            if getattr(self, field) is not None:
                check_text(field, getattr(self, field))
        # The source's texts (a licence, a file name) are outside text the model card writes
        # escaped, and predict and web do not show: they are held to their types alone.
        for key, value in (self.source or {}).items():
            if not isinstance(value, (str, int, float, type(None))):
                raise BadInput(f"source {key!r:.40} must be text, a number or null")

    def replace(self, **changes) -> "ModelInfo":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names) if self.class_names is not None else None
        return {"version": INFO_VERSION, **data}

    @classmethod
    def from_dict(cls, data) -> "ModelInfo":
        """The facts of a stored dict (this version's); ValueError naming a malformed field."""
        fields = {
            "config": (dict,),
            "preprocessing": (dict,),
            "class_names": (list, type(None)),
            "variant": (str, type(None)),
            "raw_rgb": (bool,),
            "pooling": (str, type(None)),
            "classifier_activation": (str, type(None)),
            "source": (dict, type(None)),
        }
        for key, kinds in fields.items():
            if not isinstance(data.get(key), kinds):
                wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise BadInput(f"'{key}' must be {wanted}, got {json.dumps(data.get(key))[:60]}")
        if not all(isinstance(name, str) for name in data.get("class_names") or ()):
            raise BadInput("'class_names' must be a list of strings")
        try:
            pre = dict(
                data["preprocessing"],
                mean=tuple(data["preprocessing"]["mean"]),
                std=tuple(data["preprocessing"]["std"]),
            )
            return cls(
                **dict(
                    {k: data[k] for k in fields},
                    config=ConvMixerConfig(**data["config"]),
                    preprocessing=Preprocessing(**pre),
                )
            )
        except (KeyError, TypeError) as err:
            raise BadInput(
                f"'config' or 'preprocessing' has missing or unknown fields ({err})"
            ) from None


def facts_json(info: ModelInfo) -> str:
    """The facts as every file written here carries them (`INFO_MEMBER`): a `.keras` zip
    member, a SavedModel asset, a member of a TFLite file's packed zip, an ONNX
    metadata_props entry. docs/try-it.md describes the keys."""
    return json.dumps(info.to_dict(), indent=2)


def facts_from_json(data, where) -> ModelInfo:
    """The facts in `data` (what `facts_json` wrote, as text or UTF-8 bytes); BadInput
    naming `where` otherwise (see `read_json` for the limits)."""
    stored = read_json(data, where)
    if stored.get("version") != INFO_VERSION:
        raise BadInput(
            f"{where}: its {INFO_MEMBER} has version {stored.get('version')!r:.40} "
            f"(this version reads {INFO_VERSION})"
        )
    try:
        return ModelInfo.from_dict(stored)
    except BadInput as err:  # a field out of range
        raise BadInput(f"{where}: cannot read its {INFO_MEMBER}: {err}") from None


def read_json(data, where) -> dict:
    """The JSON object in `data` (text, or UTF-8 bytes) of a file's facts: at most
    FACTS_LIMIT bytes, nested at most NESTING_LIMIT levels; BadInput naming `where`
    otherwise (deep nesting included: it would be a RecursionError)."""
    if len(data) > FACTS_LIMIT:
        raise BadInput(f"{where}: its {INFO_MEMBER} is larger than {FACTS_LIMIT} bytes")
    too_deep = BadInput(f"{where}: its {INFO_MEMBER} nests deeper than {NESTING_LIMIT} levels")
    try:
        stored = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:  # deeper than json itself can go
        raise too_deep from None
    except ValueError as err:  # not UTF-8, not JSON
        raise BadInput(f"{where}: cannot read its {INFO_MEMBER}: {one_line(err)[:200]}") from None
    if _depth(stored) > NESTING_LIMIT:
        raise too_deep
    if not isinstance(stored, dict):
        raise BadInput(f"{where}: its {INFO_MEMBER} is not a JSON object")
    return stored


def _depth(value) -> int:
    """How deep lists and objects nest in `value` (a JSON value), counted up to one past
    NESTING_LIMIT, without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending and deepest <= NESTING_LIMIT:
        item, level = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            inside = item.values() if isinstance(item, dict) else item
            pending += [(child, level + 1) for child in inside]
    return deepest


def facts_file(path) -> Optional[bytes]:
    """The bytes of the facts file `path` (a SavedModel's asset, the facts beside Keras'
    unzipped layout), or None when there is none; BadInput for anything but a regular file
    of at most FACTS_LIMIT bytes (a FIFO would block the read)."""
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise BadInput(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            return f.read(FACTS_LIMIT + 1)
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror or err}") from None


# What a damaged zip archive raises in zipfile (a header, a compressed stream, a name).
_ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError)
_ZIP_ERRORS += (ValueError, OverflowError, zlib.error, struct.error)


def zip_member(path, name, *, limit: int = FACTS_LIMIT) -> Optional[bytes]:
    """The bytes of member `name` of zip archive `path` (a .keras file, the archive packed in
    a .tflite file), or None when it holds no such member. At most `limit` bytes: the size
    the archive declares is checked before anything is inflated, and what inflates is
    counted too (a declared size may lie). BadInput when the archive cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((i for i in archive.infolist() if i.filename == name), None)
            if member is None:
                return None
            data = b""
            if member.file_size <= limit:
                with archive.open(member) as stream:
                    data = stream.read(limit + 1)
    except _ZIP_ERRORS as err:
        raise BadInput(
            f"{path}: cannot read {name} from its zip archive: {one_line(err)[:200]}"
        ) from None
    if member.file_size > limit or len(data) > limit:
        raise BadInput(
            f"{path}: its {name} inflates to more than {limit} bytes "
            f"(the archive says {member.file_size})"
        )
    return data


def attach(model, info: ModelInfo):
    """Stores `info` on the in-memory `model` (and returns the model)."""
    model.convmixer_info = info
    return model


def info_of(model) -> ModelInfo:
    """The facts of `model`: those it carries, or, for a model loaded by plain Keras from a
    file without them, what an earlier version would have stored (`legacy_info`)."""
    info = getattr(model, "convmixer_info", None)
    return info if isinstance(info, ModelInfo) else legacy_info(model)


def layer_facts(model) -> dict:
    """What the layers of a ConvMixer built here say about it."""
    layers = {layer.name: layer for layer in model.layers}
    try:
        stem, spatial = layers[STEM_CONV], layers[block_layer(0, "dw_conv")]
        activation = layers[STEM_ACT].get_config()["activation"]
    except KeyError as missing:
        raise BadInput(
            f"model {model.name!r} is not a ConvMixer built by convmixer_tf "
            f"(it has no layer {missing})"
        ) from None
    head = layers.get(HEAD)
    config = ConvMixerConfig(
        dim=stem.filters,
        depth=sum(1 for name in layers if name.endswith("_pw_conv")),
        kernel_size=spatial.kernel_size[0],
        patch_size=stem.kernel_size[0],
        activation=activation,
        num_classes=head.units if head is not None else 0,
        depthwise=type(spatial).__name__ == "DepthwiseConv2D",
    )
    norm = layers.get(PREPROCESSING)
    return {
        "config": config,
        "raw_rgb": norm is not None,
        "pooling": next((kind for kind, name in POOLING_LAYERS.items() if name in layers), None),
        "classifier_activation": head.get_config()["activation"] if head is not None else None,
        "normalisation": None
        if norm is None
        else Preprocessing.mean_std_of(
            np.ravel(np.asarray(norm.scale, np.float64)),
            np.ravel(np.asarray(norm.offset, np.float64)),
        ),
    }


def legacy_info(model, stored: Optional[dict] = None) -> ModelInfo:
    """The facts of a model saved by an earlier version: its version-1 `stored` facts
    (config, preprocessing, class names, variant), or none at all, completed from its layers."""
    facts = layer_facts(model)
    linear = facts["classifier_activation"] in (None, "linear")
    built = dict(
        raw_rgb=facts["raw_rgb"],
        pooling=facts["pooling"],
        classifier_activation=None if linear else facts["classifier_activation"],
    )
    if stored is not None:
        info = ModelInfo.from_dict(dict(stored, **built, source=None))
        if facts["raw_rgb"]:
            info = info.replace(preprocessing=info.preprocessing.replace(**facts["normalisation"]))
        return info
    # No facts at all. The converter named a converted released model after its variant,
    # so the model's name is the one fact left of the transform it needs (a guess from a
    # name, for these files only); anything else gets ImageNet's.
    variant = model.name if model.name in VARIANTS else None
    pre = VARIANTS[variant].preprocessing if variant else Preprocessing()
    if facts["normalisation"]:
        pre = pre.replace(**facts["normalisation"])
    return ModelInfo(facts["config"], pre.for_input(model.input_shape[1:]), None, variant, **built)
