"""Every reader of a model file's facts, and of class names, against Hypothesis: the JSON of
each file format (a .keras member, a SavedModel asset, the zip packed in a .tflite file,
ONNX metadata_props), the containers' bytes themselves, labels files and class names. The
property is one for all: any input gives a valid result or BadInput with a one-line
message, never another exception, in bounded time. A few hundred examples each in the
fast set, thousands in the slow twin."""

import copy
import io
import json
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convmixer_tf import labels, saving
from convmixer_tf.config import ConvMixerConfig
from convmixer_tf.errors import BadInput
from convmixer_tf.export import metadata, onnx, saved_model
from convmixer_tf.facts import Facts

# A deadline per example: bounded time (the slowest honest example takes milliseconds; a
# shared two-core machine gets slack).
FAST = settings(max_examples=200, deadline=3000, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, deadline=3000, suppress_health_check=list(HealthCheck))


def fuzzed(*strategies):
    """A property as two tests: the fast one and its slow twin (@pytest.mark.slow)."""

    def tests(prop):
        return FAST(given(*strategies)(prop)), pytest.mark.slow(SLOW(given(*strategies)(prop)))

    return tests


def holds(read, *args, kinds=(Facts, type(None))):
    """read(*args) is a result of `kinds`, or BadInput with a one-line message."""
    try:
        result = read(*args)
    except BadInput as err:
        assert str(err) and "\n" not in str(err), repr(err)
        return None
    assert isinstance(result, kinds), result
    return result


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=24,
)
VALID = json.loads(
    Facts(
        ConvMixerConfig(dim=8, depth=1, num_classes=3), class_names=("cat", "dog", "eel")
    ).to_json()
)
PLACES = [(key,) for key in VALID] + [
    (group, key) for group in ("config", "preprocessing") for key in VALID[group]
]


@st.composite
def facts(draw):
    """The facts of a valid file with a few fields replaced by any JSON, or removed."""
    found = copy.deepcopy(VALID)
    for place in draw(st.lists(st.sampled_from(PLACES), max_size=3)):
        where = found.get(place[0]) if len(place) == 2 else found
        if not isinstance(where, dict):
            continue
        if draw(st.booleans()):
            where[place[-1]] = draw(JSON)
        else:
            where.pop(place[-1], None)
    return found


TEXTS = st.one_of(
    facts().map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=200),
    st.integers(0, 5000).map(
        lambda depth: '{"version": 2, "x": ' + "[" * depth + "]" * depth + "}"
    ),
    st.sampled_from(
        ['{"version": 2, "config": 1' + "0" * 5000 + "}", '{"version": NaN}', "\ufeff{}"]
    ),
)
DATA = st.one_of(TEXTS.map(str.encode), st.binary(max_size=300))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _facts_text(data):
    holds(Facts.from_json, data, "facts")


test_facts_json, test_facts_json_slow = fuzzed(DATA)(_facts_text)


def test_a_config_field_named_by_a_newline_is_one_line():
    """The slow property's find: the unknown field's name reached the message raw."""
    facts = json.loads(Facts(ConvMixerConfig(dim=8, depth=1)).to_json())
    facts["config"] = {"\n": None}
    _facts_text(json.dumps(facts).encode())


def _zipped(name: bytes, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("labels.txt", "cat\ndog\neel\n")
        archive.writestr(name, data)
    return out.getvalue()


def _keras_member(folder, data):
    path = folder / "model.keras"
    path.write_bytes(_zipped("convmixer.json", data))
    holds(saving.stored_facts, path)


test_keras_member, test_keras_member_slow = fuzzed(DATA)(_keras_member)


def _saved_model_asset(folder, data):
    (folder / "saved_model" / "assets").mkdir(parents=True, exist_ok=True)
    (folder / "saved_model" / "assets" / "convmixer.json").write_bytes(data)
    holds(saved_model.read_facts, folder / "saved_model")


test_saved_model_asset, test_saved_model_asset_slow = fuzzed(DATA)(_saved_model_asset)

TFLITE_HEAD = b"\x1c\x00\x00\x00TFL3" + bytes(54)  # where a flatbuffer would be


def _tflite_packed(folder, data):
    path = folder / "model.tflite"
    path.write_bytes(TFLITE_HEAD + _zipped("convmixer.json", data))
    holds(metadata.packed_facts, path)


test_tflite_packed, test_tflite_packed_slow = fuzzed(DATA)(_tflite_packed)


def _onnx_model(facts_text: str, others: dict) -> bytes:
    """A small ONNX model (built by the onnx package) whose metadata_props hold the facts
    beside other entries."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    weights = onnx.numpy_helper.from_array(np.ones((48, 3), np.float32), "w")
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weights]))
    for key, value in others.items():
        model.metadata_props.add(key=key, value=value)
    model.metadata_props.add(key="convmixer.json", value=facts_text)
    return model.SerializeToString()


def _onnx_metadata(folder, text, others):
    """The file's own bytes read as the onnx package reads them: the same facts."""
    path = folder / "model.onnx"
    path.write_bytes(_onnx_model(text, others))
    try:
        expected = Facts.from_json(text, str(path))
    except BadInput:
        expected = BadInput
    found = holds(onnx.read_facts, path)
    assert found == (None if expected is BadInput else expected)
    assert onnx.graph_shows(path)[0] is False


test_onnx_metadata, test_onnx_metadata_slow = fuzzed(
    TEXTS, st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3)
)(_onnx_metadata)


@st.composite
def damaged(draw, good: bytes):
    """`good` with a few bytes changed, some cut off, or bytes of no format at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=400))
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


GOOD_ONNX = _onnx_model(json.dumps(VALID), {"author": "someone"})
GOOD_ZIP = _zipped("convmixer.json", json.dumps(VALID).encode())


def _onnx_bytes(folder, data):
    path = folder / "damaged.onnx"
    path.write_bytes(data)
    holds(onnx.read_facts, path)
    shown = holds(onnx.graph_shows, path, kinds=tuple)
    assert shown is None or [type(part) for part in shown] == [bool, dict], shown


test_onnx_bytes, test_onnx_bytes_slow = fuzzed(damaged(GOOD_ONNX))(_onnx_bytes)


def _zip_bytes(folder, data):
    (folder / "damaged.keras").write_bytes(data)
    holds(saving.stored_facts, folder / "damaged.keras")
    (folder / "damaged.tflite").write_bytes(TFLITE_HEAD + data)
    holds(metadata.packed_facts, folder / "damaged.tflite")


test_zip_bytes, test_zip_bytes_slow = fuzzed(damaged(GOOD_ZIP))(_zip_bytes)


def _labels_file(folder, data):
    path = folder / "labels.txt"
    path.write_bytes(data)
    names = holds(labels.read_labels, path, kinds=tuple)
    if names is not None:  # what a labels file gives passes the class-name rule
        labels.check_class_names(names, len(names))


LABEL_TEXT = st.lists(st.text(max_size=12), max_size=8).map("\n".join).map(str.encode)
test_labels_file, test_labels_file_slow = fuzzed(st.one_of(LABEL_TEXT, st.binary(max_size=200)))(
    _labels_file
)


def _class_names(names, classes):
    holds(labels.check_class_names, names, classes, kinds=type(None))
    if all(n.isprintable() and n.strip() for n in names) and len(names) == classes > 0:
        labels.check_class_names(names, classes)  # a valid list passes
    else:
        with pytest.raises(BadInput):
            labels.check_class_names(names, classes)


test_class_names, test_class_names_slow = fuzzed(
    st.lists(st.text(max_size=8), max_size=6), st.integers(0, 6)
)(_class_names)


def test_the_rule_refuses_what_reorders_or_hides_text():
    for name in ("\u202egnp.exe", "a\u200bb", "x\u2066y", "tab\there", "bell\x07"):
        with pytest.raises(BadInput, match="character U\\+"):
            labels.check_class_names([name], 1)
    labels.check_class_names(["tabby cat", "café", "日本"], 3)


def test_a_graph_that_feeds_itself_ends_the_walk_back(folder):
    """Two Identity nodes feeding each other: the walk from the output ends, no softmax."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["b"], ["a"])]
    output = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])
    path = folder / "loop.onnx"
    path.write_bytes(
        helper.make_model(helper.make_graph(nodes, "loop", [], [output])).SerializeToString()
    )
    assert onnx.graph_shows(path)[0] is False


def _layer(kind, name, source, **config):
    """A layer of a Keras functional config, fed by layer `source` (None: none)."""
    history = {"config": {"shape": [None, 8], "keras_history": [source, 0, 0]}}
    inbound = [{"args": [history], "kwargs": {}}] if source else []
    return {"class_name": kind, "name": name, "config": config, "inbound_nodes": inbound}


KERAS_CONFIG = {
    "class_name": "Functional",
    "config": {
        "layers": [
            _layer("InputLayer", "images", None, batch_shape=[None, 32, 32, 3]),
            _layer("Conv2D", "stem_conv", "images", filters=8, kernel_size=[4, 4], groups=1),
            _layer("BatchNormalization", "stem_bn", "stem_conv"),
            _layer("DepthwiseConv2D", "dw", "stem_bn", kernel_size=[3, 3], depth_multiplier=1),
            _layer("GlobalAveragePooling2D", "avg_pool", "dw"),
            _layer("Dense", "head", "avg_pool", units=3),
        ]
    },
}
KERAS_PLACES = [
    ("config", "layers", i, "config", key)
    for i in range(6)
    for key in ("filters", "kernel_size", "units", "groups", "depth_multiplier", "batch_shape")
] + [
    ("config", "layers", i, key)
    for i in range(6)
    for key in ("class_name", "name", "inbound_nodes", "build_config")
]


@st.composite
def keras_configs(draw):
    """Keras' config.json of a small ConvMixer with a few fields replaced by any JSON (or
    a huge size), or removed."""
    found = copy.deepcopy(KERAS_CONFIG)
    for place in draw(st.lists(st.sampled_from(KERAS_PLACES), max_size=3)):
        where = found
        for key in place[:-1]:
            where = where[key]
        if draw(st.booleans()):
            where[place[-1]] = draw(JSON | st.integers(0, 10**12))
        else:
            where.pop(place[-1], None)
    return found


def _declared_weights(folder, config, weights_size):
    """Any config.json: a count of weights per layer or BadInput naming the file, and a
    count that is more than model.weights.h5 holds is refused (at 2 bytes a weight)."""
    path = folder / "model.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("config.json", config)
        archive.writestr("model.weights.h5", bytes(weights_size))
    try:
        saving.check_declared_weights(path)
        refused = False
    except BadInput as err:
        assert str(err) and "\n" not in str(err), repr(err)
        refused = True
    try:
        counts = saving.declared_weights(json.loads(config))
    except (ValueError, RecursionError):
        return
    assert all(isinstance(n, int) and n >= 0 for n in counts.values()), counts
    assert refused == (2 * sum(counts.values()) > weights_size), counts


KERAS_TEXTS = st.one_of(keras_configs().map(json.dumps), TEXTS)
test_declared_weights, test_declared_weights_slow = fuzzed(KERAS_TEXTS, st.integers(0, 4000))(
    _declared_weights
)


def test_the_weights_declared_are_the_weights_keras_builds():
    """The count of a real model's config is the model's own."""
    import convmixer_tf

    model = convmixer_tf.ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=4, num_classes=5)
    config = json.loads(model.to_json())
    assert sum(saving.declared_weights(config).values()) == model.count_params()
