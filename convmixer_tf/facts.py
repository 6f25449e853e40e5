"""A ConvMixer's facts (`Facts`: its architecture, how it was built, its preprocessing,
class names, where its weights came from), which travel with the model and inside every
file written from it: their one JSON form (`Facts.to_json`, the file `FACTS_FILE`), read
back within limits (`Facts.from_json`, `read_json`, `file_bytes`, `zip_member`).

A model built here carries its facts (`attach`, `facts_of`); `saving` stores them in and
reads them from .keras files. A model that carries none (loaded by plain Keras, or from a
file saved before facts were stored) is described from its layers by one function,
`legacy_facts`. No Keras import at import time.
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

from convmixer_tf.config import (
    HEAD,
    POOLING_LAYERS,
    PREPROCESSING,
    STEM_ACT,
    STEM_CONV,
    VARIANTS,
    ConvMixerConfig,
    Preprocessing,
    block_layer,
)
from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.labels import check_class_names, check_text

FACTS_FILE = "convmixer.json"
FACTS_VERSION = 2
POOLINGS = ("avg", "max", None)
# The most a file's facts may take (bytes) and the deepest their JSON may nest: the facts of
# a model with 21,841 long class names take about 1 MB, and nest three levels.
FACTS_LIMIT = 4 * 2**20
NESTING_LIMIT = 16


@dataclasses.dataclass(frozen=True)
class Facts:
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

    def replace(self, **changes) -> "Facts":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data) -> "Facts":
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
                f"'config' or 'preprocessing' has missing or unknown fields ({one_line(err)[:200]})"
            ) from None

    def to_json(self) -> str:
        """The facts as every file written here carries them (`FACTS_FILE`): a `.keras`
        zip member, a SavedModel asset, a member of a TFLite file's packed zip, an ONNX
        metadata_props entry. docs/try-it.md describes the keys."""
        data = dict(dataclasses.asdict(self), class_names=self.class_names)
        return json.dumps({"version": FACTS_VERSION, **data}, indent=2)

    @classmethod
    def from_json(cls, data, where, model=None) -> "Facts":
        """The facts in `data` (what `to_json` wrote, as text or UTF-8 bytes); BadInput
        naming `where` otherwise (see `read_json` for the limits). With the file's `model`,
        an earlier version's facts (version 1) are read too, completed from its layers."""
        stored = read_json(data, where)
        version = stored.get("version")
        known = type(version) is int  # JSON's true and 2.0 are no versions, though 1 == True
        legacy = known and version == 1 and model is not None
        if not (known and version == FACTS_VERSION) and not legacy:
            also = "" if model is None else ", and 1 with the model"
            raise BadInput(
                f"{where}: its {FACTS_FILE} has version {version!r:.40} "
                f"(this version reads {FACTS_VERSION}{also})"
            )
        try:
            if legacy:
                return legacy_facts(model, stored)
            return cls.from_dict(stored)
        except BadInput as err:  # a field out of range
            raise BadInput(f"{where}: cannot read its {FACTS_FILE}: {err}") from None


def read_json(data, where) -> dict:
    """The JSON object in `data` (text, or UTF-8 bytes) of a file's facts: at most
    FACTS_LIMIT bytes, nested at most NESTING_LIMIT levels; BadInput naming `where`
    otherwise (deep nesting included: it would be a RecursionError)."""
    if len(data) > FACTS_LIMIT:
        raise BadInput(f"{where}: its {FACTS_FILE} is larger than {FACTS_LIMIT} bytes")
    too_deep = BadInput(f"{where}: its {FACTS_FILE} nests deeper than {NESTING_LIMIT} levels")
    try:
        stored = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:  # deeper than json itself can go
        raise too_deep from None
    except ValueError as err:  # not UTF-8, not JSON
        raise BadInput(f"{where}: cannot read its {FACTS_FILE}: {one_line(err)[:200]}") from None
    if _depth(stored) > NESTING_LIMIT:
        raise too_deep
    if not isinstance(stored, dict):
        raise BadInput(f"{where}: its {FACTS_FILE} is not a JSON object")
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


def file_bytes(path, *, limit: int = FACTS_LIMIT) -> Optional[bytes]:
    """The bytes of the file `path` that holds facts (a SavedModel's asset, the facts beside
    Keras' unzipped layout), or None when there is none; BadInput for anything but a regular file
    (a FIFO would block the read). At most `limit` bytes, and one more when it holds more."""
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise BadInput(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
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


def attach(model, facts: Facts):
    """Stores `facts` on the in-memory `model` (and returns the model): the one channel
    they travel on, read back with `facts_of`."""
    model.convmixer_facts = facts
    return model


def facts_of(model) -> Facts:
    """The facts of `model`: those it carries, or, for a model loaded by plain Keras from a
    file without them, what an earlier version would have stored (`legacy_facts`)."""
    facts = getattr(model, "convmixer_facts", None)
    return facts if isinstance(facts, Facts) else legacy_facts(model)


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


def legacy_facts(model, stored: Optional[dict] = None) -> Facts:
    """The facts of a model saved by an earlier version: its version-1 `stored` facts
    (config, preprocessing, class names, variant), or none at all, completed from its layers."""
    found = layer_facts(model)
    linear = found["classifier_activation"] in (None, "linear")
    built = dict(
        raw_rgb=found["raw_rgb"],
        pooling=found["pooling"],
        classifier_activation=None if linear else found["classifier_activation"],
    )
    if stored is not None:
        facts = Facts.from_dict(dict(stored, **built, source=None))
        if found["raw_rgb"]:
            pre = facts.preprocessing.replace(**found["normalisation"])
            facts = facts.replace(preprocessing=pre)
        return facts
    # No facts at all. The converter named a converted released model after its variant,
    # so the model's name is the one fact left of the transform it needs (a guess from a
    # name, for these files only); anything else gets ImageNet's.
    variant = model.name if model.name in VARIANTS else None
    pre = VARIANTS[variant].preprocessing if variant else Preprocessing()
    if found["normalisation"]:
        pre = pre.replace(**found["normalisation"])
    return Facts(found["config"], pre.for_input(model.input_shape[1:]), None, variant, **built)
