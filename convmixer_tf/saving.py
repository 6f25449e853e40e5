"""A ConvMixer on disk: the `.keras` file with its facts inside (`convmixer.json`, a zip
member plain `keras.models.load_model` ignores), Keras' unzipped Hub layout with the facts
beside it, and `hf://OWNER/NAME` on the Hub or in its cache. Loading checks the stored
facts against the layers; files of earlier versions are read through
`legacy_facts`."""

from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Optional

from convmixer_tf.card import model_card
from convmixer_tf.errors import BadInput, one_line
from convmixer_tf.facts import (
    FACTS_FILE,
    Facts,
    attach,
    facts_of,
    file_bytes,
    layer_facts,
    legacy_facts,
    zip_member,
)
from convmixer_tf.interrupts import remove_file
from convmixer_tf.temporaries import temporary_folder, temporary_name

HUB_SCHEME = "hf://"


def _check_agrees(model, stored: Facts, path) -> None:
    """BadInput naming the file when the facts stored in it and its layers disagree."""
    layers = layer_facts(model)
    pairs = {
        "architecture": (layers["config"], stored.config),
        "preprocessing layer": (layers["raw_rgb"], stored.raw_rgb),
        "pooling": (layers["pooling"], stored.pooling),
        "classifier activation": (
            _activation(layers["classifier_activation"]),
            _activation(stored.classifier_activation),
        ),
    }
    wrong = [
        f"{key}: the layers say {found}, {FACTS_FILE} says {claimed}"
        for key, (found, claimed) in pairs.items()
        if found != claimed
    ]
    if wrong:
        raise BadInput(
            f"{path}: its stored facts do not match its layers ({'; '.join(wrong)}); "
            "the file was edited or is damaged"
        )


def _activation(name: Optional[str]) -> str:
    return "none (logits)" if name in (None, "linear") else name


def stored_facts(path, model=None) -> Optional[Facts]:
    """The facts inside a .keras file, or beside Keras' unzipped layout in a folder
    (`model`: the file's model, needed for files of an earlier version); None for a file
    saved without one. Read within `read_json`'s limits (`Facts.from_json`); BadInput
    naming the file when the facts cannot be read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        data = file_bytes(os.path.join(path, FACTS_FILE))
    else:
        data = zip_member(path, FACTS_FILE)
    if data is None:
        return None
    return Facts.from_json(data, path, model)


def save_model(model, path) -> str:
    """Saves `model` with its facts (`facts_of`): as a .keras file with them inside, written
    atomically (a reader sees no file or the whole one), or, for `hf://OWNER/NAME`, as
    Keras' own Hub layout with them beside it and a model card, uploaded. Plain Keras
    loads either."""
    if str(path).startswith(HUB_SCHEME):
        from huggingface_hub import HfApi

        with temporary_folder() as folder:
            write_hub_folder(model, os.path.join(folder, "model"))
            repo = HfApi().create_repo(str(path)[len(HUB_SCHEME) :], exist_ok=True).repo_id
            HfApi().upload_folder(repo_id=repo, folder_path=os.path.join(folder, "model"))
        return str(path)
    path = os.fspath(path)
    tmp = temporary_name(path, suffix=".keras")  # Keras saves only to names ending in .keras
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(FACTS_FILE, facts_of(model).to_json())
        os.replace(tmp, path)
    finally:
        remove_file(tmp)
    return path


def write_hub_folder(model, folder) -> str:
    """Keras' unzipped layout of `model` in `folder` (what `model.save("hf://...")` uploads:
    config.json, metadata.json, model.weights.h5), its facts beside it, and a model card."""
    facts = facts_of(model)
    model.save(folder, zipped=False)
    with open(os.path.join(folder, FACTS_FILE), "w") as f:
        f.write(facts.to_json())
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(facts))
    return folder


def _hub_folder(path) -> str:
    """The local folder of `hf://OWNER/NAME[@REVISION]`: downloaded, or from the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = path[len(HUB_SCHEME) :].partition("@")
    try:
        folder = snapshot_download(repo, revision=revision or None)
    except LocalEntryNotFoundError:
        raise BadInput(
            f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
            f"cannot be reached; fetch it where it can: hf download {repo}"
        ) from None
    names = set(os.listdir(folder))
    if "model.keras" in names or {"config.json", "model.weights.h5"} <= names:
        return folder
    torch_weights = sorted(names & {"model.safetensors", "pytorch_model.bin"})
    if torch_weights:
        raise BadInput(
            f"{path} holds PyTorch weights ({torch_weights[0]}), not a Keras model: convert them "
            f'with convmixer_tf.create_model(VARIANT, pretrained="hf-hub:{repo}") or python -m '
            f"weights_converter --torch-ckpt hf-hub:{repo}"
        )
    raise BadInput(
        f"{path} holds no Keras model (neither model.keras nor Keras' config.json with model.weights.h5)"
    )


# Keras' files: the architecture, and the weights it is built and filled with.
KERAS_CONFIG, KERAS_WEIGHTS = "config.json", "model.weights.h5"
# The most a config.json may take (bytes): convmixer_1536_20's takes about 300 KB.
CONFIG_LIMIT = 16 * 2**20
# The most a compressed member inflates to, per byte (deflate's best ratio is about 1032:1).
INFLATION = 1032


def check_declared_weights(path) -> None:
    """BadInput naming the largest layer when the weights the `.keras` file (or Keras'
    unzipped layout) at `path` declares in its config.json take more than its
    model.weights.h5 holds: Keras allocates and initialises every declared weight before it
    reads one, so a small file could otherwise ask for gigabytes. Counted from the config
    alone (`declared_weights`), at the fewest bytes a weight is stored in (2)."""
    config, held = _keras_members(path)
    if config is None:
        return  # not a Keras file at all: Keras says so
    try:
        counts = declared_weights(json.loads(config))
    except RecursionError:
        raise BadInput(f"{path}: its {KERAS_CONFIG} nests too deep") from None
    except ValueError as err:  # not JSON, or not a Keras model's config
        raise BadInput(f"{path}: cannot read its {KERAS_CONFIG}: {one_line(err)[:200]}") from None
    total = sum(counts.values())
    if 2 * total > held:
        largest = max(counts, key=counts.get)
        raise BadInput(
            f"{path}: its {KERAS_CONFIG} declares {total:,} weights (layer {largest!r:.60} "
            f"{counts[largest]:,}), more than its {KERAS_WEIGHTS} of {held:,} bytes holds: "
            "the file was edited or is damaged"
        )


def _keras_members(path):
    """(the bytes of config.json or None, the most bytes model.weights.h5 may hold)."""
    if os.path.isdir(path):
        weights = os.path.join(path, KERAS_WEIGHTS)
        held = os.path.getsize(weights) if os.path.isfile(weights) else 0
        config = file_bytes(os.path.join(path, KERAS_CONFIG), limit=CONFIG_LIMIT)
        if config is not None and len(config) > CONFIG_LIMIT:
            raise BadInput(f"{path}: its {KERAS_CONFIG} is larger than {CONFIG_LIMIT} bytes")
        return config, held
    if not zipfile.is_zipfile(path):
        return None, 0
    config = zip_member(path, KERAS_CONFIG, limit=CONFIG_LIMIT)
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((i for i in archive.infolist() if i.filename == KERAS_WEIGHTS), None)
    except (zipfile.BadZipFile, OSError, ValueError):
        return config, 0
    if member is None:
        return config, 0
    return config, min(member.file_size, INFLATION * member.compress_size)


# The layers a ConvMixer is built of: those that hold weights, and those that pass their
# input's channels on.
_WEIGHTED = {"Conv2D", "DepthwiseConv2D", "Dense", "BatchNormalization"}
_PASSING = {"InputLayer", "Rescaling", "Activation", "Add"}
_PASSING |= {"GlobalAveragePooling2D", "GlobalMaxPooling2D"}


def declared_weights(config) -> dict:
    """{layer name: how many weights it declares} of a Keras functional model's config (the
    JSON of config.json), each layer's input channels taken from the layers that feed it and
    from its own build_config, the larger; ValueError naming a layer that is not one a
    ConvMixer is built of, or a config that is not a model's."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ValueError("not a Keras model's config")
    layers = config["config"].get("layers")
    if not isinstance(layers, list):
        raise ValueError("not a Keras functional model's config (no list of layers)")
    channels, counts = {}, {}
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            raise ValueError("a layer that is not an object")
        kind, name = layer.get("class_name"), str(layer.get("name") or "")
        if not isinstance(kind, str) or kind not in _WEIGHTED | _PASSING:
            raise ValueError(f"layer {name!r:.60} is a {kind!r:.40}, not a layer of a ConvMixer")
        fed = [channels.get(source, 0) for source in _sources(layer.get("inbound_nodes"))]
        given = layer["config"].get("batch_shape") if kind == "InputLayer" else None
        built = layer.get("build_config") if kind != "InputLayer" else None
        built = built.get("input_shape") if isinstance(built, dict) else None
        inputs = max([*fed, *_last_sizes(given), *_last_sizes(built)], default=0)
        channels[name], counts[name] = _weights_of(kind, layer["config"], inputs)
    return counts


def _sources(inbound) -> list:
    """The names of the layers whose outputs a layer's inbound_nodes take (keras_history)."""
    found, pending = [], [inbound]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            history = item.get("keras_history")
            if isinstance(history, list) and history:
                found.append(str(history[0]))
            pending += list(item.values())
        elif isinstance(item, list):
            pending += item
    return found


def _last_sizes(shape) -> list:
    """The last size of a shape ([None, 32, 32, 3] -> [3]), or of each of a list of shapes."""
    if not isinstance(shape, list) or not shape:
        return []
    if all(isinstance(part, list) for part in shape):
        return [size for part in shape for size in _last_sizes(part)]
    return [_whole(shape[-1])] if shape[-1] is not None else []


def _weights_of(kind: str, config: dict, inputs: int) -> tuple:
    """(output channels, weights) of a layer of `kind` with `inputs` channels in."""
    if kind == "Conv2D":
        filters, groups = _whole(config.get("filters")), max(1, _whole(config.get("groups", 1)))
        return filters, filters * (_area(config) * (inputs // groups) + 1)
    if kind == "DepthwiseConv2D":
        out = inputs * _whole(config.get("depth_multiplier", 1))
        return out, out * (_area(config) + 1)
    if kind == "Dense":
        units = _whole(config.get("units"))
        return units, units * (inputs + 1)
    return inputs, 4 * inputs if kind == "BatchNormalization" else 0


def _area(config: dict) -> int:
    size = config.get("kernel_size")
    sizes = size if isinstance(size, list) else [size, size]
    return math.prod(_whole(side) for side in sizes)


def _whole(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a size that is not a whole number: {value!r:.40}")
    return value


def load_model(path, role: str = "model"):
    """Loads a ConvMixer with its facts attached: a .keras file, a folder in Keras' unzipped
    layout, or `hf://OWNER/NAME[@REVISION]` (either, from the Hub or its cache).
    ValueError (exit 2) naming the problem for a missing, truncated or foreign file.

    Example:
        >>> model = load_model("convmixer_768_32_keras/model.keras")   # doctest: +SKIP
        >>> facts_of(model).class_names[:2]                             # doctest: +SKIP
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
        raise BadInput(
            f"cannot load {role} {path}: not a .keras file (a .keras file is a zip archive; "
            "is it truncated or corrupt?)"
        )
    check_declared_weights(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any reason the file does not load
        raise BadInput(f"cannot load {role} {path}: {one_line(err)[:300]}") from None
    facts = stored_facts(path, model)
    if facts is None:
        try:
            facts = legacy_facts(model)
        except BadInput as err:  # a preprocessing layer of non-finite numbers, say
            raise BadInput(f"{path}: {err}") from None
    _check_agrees(model, facts, path)
    return attach(model, facts)
