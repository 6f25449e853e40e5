"""TFLite Model Metadata: what MediaPipe Tasks and the TFLite Support library read to use
a .tflite file as it is (the image input and its normalisation, the output's scores and
their class names).

The metadata is a flatbuffer of the published schema (`metadata_schema.fbs`, file
identifier "M001", the schema that ships with MediaPipe and TFLite Support), written
here with `flatbuffers` field by field; field numbers are the schema's, in its order.
It goes into the model as a buffer named "TFLITE_METADATA", and the class names as
`labels.txt`, a TENSOR_AXIS_LABELS file packed in a zip archive appended to the model,
which is where both readers look for associated files. The model's facts (`convmixer.json`)
are packed there too, so the file describes itself to `convmixer_tf.predict`.
"""

from __future__ import annotations

import io
import mmap
import os
import zipfile
from typing import Optional

import numpy as np

from convmixer_tf.config import PIXEL_MAX
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import FACTS_FILE, Facts, facts_of, zip_member
from convmixer_tf.version import __version__

METADATA_NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"  # no field here needs a newer parser

# Enum and union values of metadata_schema.fbs.
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # union ContentProperties
_NORMALIZATION_OPTIONS = 1  # union ProcessUnitOptions
_RGB = 1  # enum ColorSpaceType
_TENSOR_AXIS_LABELS = 2  # enum AssociatedFileType


# What a file's metadata says of the weights' terms: this code is Apache-2.0; the weights are not ours.
LICENSE = "code: Apache-2.0 (convmixer-tf); weights: the licence of the checkpoint they come from"


def normalisation(facts) -> tuple:
    """(mean, std): the normalisation a client applies to raw pixels before feeding the
    model, (pixel - mean) / std per channel; mean 0, std 1 for a graph that takes raw RGB."""
    if facts.raw_rgb:
        return (0.0,) * 3, (1.0,) * 3
    return facts.preprocessing.pixel_mean_std()


class _Builder:
    """Tables of the schema, built bottom-up (children before their parents)."""

    def __init__(self):
        import flatbuffers

        self.b = flatbuffers.Builder(1024)

    def table(self, *fields):
        """fields[i] is slot i: None (absent), ("offset", o), ("int8", v) or ("uint32", v)."""
        b = self.b
        b.StartObject(len(fields))
        for slot, field in enumerate(fields):
            if field is None:
                continue
            kind, value = field
            if kind == "offset":
                b.PrependUOffsetTRelativeSlot(slot, value, 0)
            elif kind == "int8":
                b.PrependInt8Slot(slot, value, 0)
            else:
                b.PrependUint32Slot(slot, value, 0)
        return b.EndObject()

    def string(self, text):
        return ("offset", self.b.CreateString(text))

    def floats(self, values):
        return ("offset", self.b.CreateNumpyVector(np.asarray(values, np.float32)))

    def vector(self, offsets):
        self.b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            self.b.PrependUOffsetTRelative(offset)
        return ("offset", self.b.EndVector())

    def finish(self, root) -> bytes:
        self.b.Finish(root, file_identifier=b"M001")
        return bytes(self.b.Output())


def metadata_flatbuffer(model, output: str) -> bytes:
    """The ModelMetadata flatbuffer of a TFLite file of the Keras `model` (a fixed input size,
    carrying its facts) that gives `output` ("probabilities" or "logits"): what it is, the
    input normalisation a client applies, the class names."""
    facts, size = facts_of(model), int(model.input_shape[1])
    c = facts.config
    description = (
        f"ConvMixer-{c.dim}/{c.depth} (kernel {c.kernel_size}, patch {c.patch_size}, {c.activation}) "
        f"image classifier, {c.num_classes} classes, {output}; input {size} px RGB"
    )
    w = _Builder()
    inp, out = _input_tensor(w, facts, size), _output_tensor(w, facts.class_names, output)
    subgraph = w.table(w.string("image_classifier"), None, w.vector([inp]), w.vector([out]))
    root = w.table(
        w.string(facts.variant or model.name),
        w.string(description),
        w.string(f"convmixer-tf {__version__}"),
        w.vector([subgraph]),
        w.string("convmixer-tf"),
        w.string(LICENSE),
        None,
        w.string(MIN_PARSER_VERSION),
    )
    return w.finish(root)


def _input_tensor(w: _Builder, facts, size: int):
    """TensorMetadata of the image input: RGB of `size`, its normalisation, its range."""
    mean, std = normalisation(facts)
    image = w.table(("int8", _RGB), ("offset", w.table(("uint32", size), ("uint32", size))))
    norm = w.table(w.floats(mean), w.floats(std))
    low = [(0.0 - m) / s for m, s in zip(mean, std)]
    high = [(PIXEL_MAX - m) / s for m, s in zip(mean, std)]
    return w.table(
        w.string("image"),
        w.string(f"RGB image, {size}x{size}, pixels 0-{PIXEL_MAX:.0f}"),
        None,
        ("offset", w.table(("int8", _IMAGE_PROPERTIES), ("offset", image))),
        w.vector([w.table(("int8", _NORMALIZATION_OPTIONS), ("offset", norm))]),
        ("offset", w.table(w.floats(high), w.floats(low))),
    )


def _output_tensor(w: _Builder, class_names, output: str):
    """TensorMetadata of the scores: probabilities (range 0-1) or logits, and the labels file."""
    labels = None
    if class_names is not None:
        about = w.string("class names, one per line, in output order")
        labels = w.vector([w.table(w.string(LABELS_FILE), about, ("int8", _TENSOR_AXIS_LABELS))])
    probabilities = output == "probabilities"
    value_range = None
    if probabilities:
        value_range = ("offset", w.table(w.floats([1.0]), w.floats([0.0])))
    return w.table(
        w.string("probability" if probabilities else "logits"),
        w.string("probability of each class" if probabilities else "score (logit) of each class"),
        None,
        ("offset", w.table(("int8", _FEATURE_PROPERTIES), ("offset", w.table()))),
        None,
        value_range,
        labels,
    )


def with_metadata(flatbuffer: bytes, model, output: str) -> bytes:
    """A .tflite `flatbuffer` of the Keras `model` with its metadata (`metadata_flatbuffer`)
    in it, and its labels file and facts packed."""
    from tensorflow.lite.tools import flatbuffer_utils

    tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    add_metadata(tflite, METADATA_NAME, metadata_flatbuffer(model, output))
    packed = io.BytesIO(flatbuffer_utils.convert_object_to_bytearray(tflite))
    facts = facts_of(model)
    with zipfile.ZipFile(packed, "a", compression=zipfile.ZIP_STORED) as archive:
        if facts.class_names is not None:
            archive.writestr(LABELS_FILE, "".join(f"{name}\n" for name in facts.class_names))
        archive.writestr(FACTS_FILE, facts.to_json())
    return packed.getvalue()


def add_metadata(tflite, name: str, data: bytes) -> None:
    """Puts `data` in a .tflite model object (flatbuffer_utils') as its metadata entry `name`,
    a buffer of its own, in place of an earlier entry of that name."""
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    tflite.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = name.encode(), len(tflite.buffers) - 1
    tflite.metadata = [m for m in (tflite.metadata or []) if m.name != entry.name] + [entry]


def read_metadata(path) -> Optional[bytes]:
    """The metadata flatbuffer inside a .tflite file, or None for a file without one.
    Reads the flatbuffer in place (only the metadata entries), never unpacking the model."""
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.Model.GetRootAs(f.read(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_NAME:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


def packed_labels(path) -> Optional[list]:
    """The class names packed in a .tflite file, or None."""
    data = packed_file(path, LABELS_FILE)
    return None if data is None else data.decode("utf-8", "replace").splitlines()


def packed_file(path, name) -> Optional[bytes]:
    """The bytes of file `name` packed in a .tflite file (at most `facts.FACTS_LIMIT`),
    or None when the file packs no archive or the archive no such file; BadInput for an
    archive that cannot be read or a member larger than that."""
    if not zipfile.is_zipfile(path):
        return None
    return zip_member(path, name)


def packed_facts(path):
    """The facts a .tflite file carries (`FACTS_FILE`, packed beside its labels), or None
    for a file that carries none; BadInput when they cannot be read, or when the file
    names them but the archive at its end is gone (a download cut short)."""
    data = packed_file(path, FACTS_FILE)
    if data is None and _mentions(path, FACTS_FILE.encode()):
        raise BadInput(
            f"{path} is truncated or damaged: the zip archive at its end, which holds its "
            f"{FACTS_FILE}, cannot be read"
        )
    if data is None:
        return None
    facts = Facts.from_json(data, path)
    _check_labels(path, facts)
    return facts


def _check_labels(path, facts: Facts) -> None:
    """BadInput naming both when the file's labels (what MediaPipe, so the page and phone
    apps, shows) and its facts' class names (what `predict` shows) differ."""
    labels = packed_labels(path)
    names = list(facts.class_names) if facts.class_names is not None else None
    if labels == names:
        return
    if labels is None:
        raise BadInput(f"{path}: its {FACTS_FILE} names its classes and it packs no {LABELS_FILE}")
    if names is None:
        raise BadInput(f"{path}: it packs a {LABELS_FILE} and its {FACTS_FILE} names no classes")
    if len(labels) != len(names):
        raise BadInput(
            f"{path}: its {LABELS_FILE} names {len(labels)} classes, its {FACTS_FILE} {len(names)}"
        )
    i = next(i for i, (label, name) in enumerate(zip(labels, names)) if label != name)
    raise BadInput(
        f"{path}: class {i} is {labels[i]!r:.60} in its {LABELS_FILE} (what apps show) and "
        f"{names[i]!r:.60} in its {FACTS_FILE} (what predict shows)"
    )


def _mentions(path, text: bytes) -> bool:
    """Whether `text` occurs in the file at `path` (mapped, not read into memory)."""
    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:  # an empty file cannot be mapped
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(text) >= 0
