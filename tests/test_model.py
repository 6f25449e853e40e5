import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import TINY, randomize_batchnorm

import convmixer_tf
from convmixer_tf import ConvMixer, create_model, list_variants
from convmixer_tf.config import IMAGENET_MEAN, IMAGENET_STD
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import attach

# timm's parameter counts (parameters only; BN running statistics are buffers there).
TIMM_PARAMS = {
    "convmixer_1536_20": 51_625_960,
    "convmixer_768_32": 21_110_248,
    "convmixer_1024_20_ks9_p14": 24_383_464,
}
IMAGENET_VARIANTS = list(TIMM_PARAMS)


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_variant_table():
    names = list_variants()
    for name in IMAGENET_VARIANTS + ["convmixer_256_8", "convmixer_256_16"]:
        assert name in names
    assert convmixer_tf.get_variant("convmixer_768_32").config.activation == "relu"
    assert convmixer_tf.get_variant("convmixer_1536_20").config.activation == "gelu"
    pre = convmixer_tf.get_variant("convmixer_1024_20_ks9_p14").preprocessing
    assert (pre.input_size, pre.crop_pct, pre.interpolation) == (224, 0.96, "bicubic")
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
    cifar = convmixer_tf.get_variant("convmixer_256_8").config
    assert (cifar.dim, cifar.depth, cifar.kernel_size, cifar.patch_size) == (256, 8, 5, 2)


@pytest.mark.parametrize("name", IMAGENET_VARIANTS)
def test_parameter_counts_match_timm(name):
    model = create_model(name)
    assert trainable_count(model) == TIMM_PARAMS[name]
    assert model.output_shape == (None, 1000)


@pytest.mark.parametrize("name", list(convmixer_tf.VARIANTS))
def test_every_variant_shapes_at_224_odd_and_dynamic(name):
    cfg = convmixer_tf.get_variant(name).config
    x = np.zeros((1, 75, 100, 3), "float32")
    dynamic = create_model(name, input_shape=(None, None, 3))
    assert dynamic.input_shape == (None, None, None, 3)
    assert tuple(dynamic(x).shape) == (1, cfg.num_classes)
    fixed = create_model(name, input_shape=(75, 100, 3), include_top=False, pooling=None)
    assert fixed.output_shape == (None, 75 // cfg.patch_size, 100 // cfg.patch_size, cfg.dim)
    assert create_model(name, input_shape=(224, 224, 3)).output_shape == (None, cfg.num_classes)
    del dynamic, fixed


@pytest.mark.parametrize("pooling", ["avg", "max", None])
def test_feature_extraction_pooling(pooling):
    model = ConvMixer(**TINY, input_shape=(None, None, 3), include_top=False, pooling=pooling)
    x = np.random.default_rng(0).normal(size=(2, 33, 21, 3)).astype("float32")
    y = np.asarray(model(x))
    if pooling is None:
        assert y.shape == (2, 16, 10, TINY["dim"])
        return
    assert y.shape == (2, TINY["dim"])
    features = ConvMixer(**TINY, include_top=False, pooling=None)
    features.set_weights(model.get_weights())
    fmap = np.asarray(features(x))
    ref = fmap.mean(axis=(1, 2)) if pooling == "avg" else fmap.max(axis=(1, 2))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_layers_follow_pytorch_conventions():
    model = ConvMixer(**TINY, activation="gelu")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5 and layer.momentum == 0.9
    assert isinstance(model.get_layer("block1_dw_conv"), keras.layers.DepthwiseConv2D)
    # Exact (erf) GELU, not the tanh approximation.
    x = np.linspace(-4, 4, 101).astype("float32")
    from math import erf, sqrt

    exact = np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in x])
    act = model.get_layer("stem_act")
    np.testing.assert_allclose(np.asarray(act(x)), exact, atol=1e-6)
    names = [layer.name for layer in model.layers]
    for i in range(TINY["depth"]):
        for part in ("dw_conv", "dw_bn", "pw_conv", "pw_bn"):
            assert f"block{i}_{part}" in names
    full = ConvMixer(**TINY, depthwise=False)
    assert type(full.get_layer("block0_dw_conv")) is keras.layers.Conv2D


def test_in_graph_preprocessing_equals_hand_computation():
    model = ConvMixer(**TINY, include_preprocessing=True, include_top=False, pooling=None)
    pre = keras.Model(model.input, model.get_layer("preprocessing").output)
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    ref = (x / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(pre(x)), ref, atol=2e-6)
    # And the rest of the network sees exactly what a model without it would.
    plain = ConvMixer(**TINY, include_preprocessing=False, include_top=False, pooling=None)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(
        np.asarray(model(x)), np.asarray(plain(ref.astype("float32"))), atol=1e-4
    )


def test_get_config_from_config_round_trip():
    model = randomize_batchnorm(
        ConvMixer(**TINY, input_shape=(32, 32, 3), include_preprocessing=True)
    )
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(model(x)))
    assert convmixer_tf.facts_of(clone).config == convmixer_tf.ConvMixerConfig(**TINY)


LOAD_WITHOUT_PACKAGE = r"""
import json, os, sys
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1])
assert "convmixer_tf" not in sys.modules, "the loader must not need convmixer_tf"
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model.predict(x, verbose=0)))
print(json.dumps({"backend": keras.backend.backend()}))
"""


def _run_clean(script, *args, backend="tensorflow"):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    # Run from a directory where convmixer_tf is not importable by accident.
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(args[0]),
        timeout=300,
    )


# In the fast set a clean process loads a small file in test_model_facts_travel_inside_the_keras_file.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("tiny", marks=pytest.mark.slow),
        pytest.param("convmixer_768_32", marks=pytest.mark.slow),
    ],
)
def test_keras_file_loads_without_convmixer_tf(tmp_path, name):
    if name == "tiny":
        model = ConvMixer(**TINY, input_shape=(32, 32, 3), include_preprocessing=True)
        x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    else:
        model = create_model(name)
        x = np.random.default_rng(3).normal(size=(1, 224, 224, 3)).astype("float32")
    randomize_batchnorm(model)
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    proc = _run_clean(
        LOAD_WITHOUT_PACKAGE, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0))


BACKEND_SCRIPT = r"""
import json, sys
import numpy as np
import keras
sys.path.insert(0, sys.argv[1])
from convmixer_tf import ConvMixer
model = ConvMixer(dim=8, depth=2, kernel_size=5, patch_size=2, num_classes=4,
                  input_shape=(None, None, 3), include_preprocessing=True)
model.load_weights(sys.argv[2])
x = np.load(sys.argv[3])
y = keras.ops.convert_to_numpy(model(x, training=False))
np.save(sys.argv[4], y)
print(json.dumps({"backend": keras.backend.backend()}))
"""


# In the fast set, JAX trains in test_two_devices_agree_with_one; TensorFlow runs every other test.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_runs_on_keras_backends(tmp_path, backend):
    pytest.importorskip(backend if backend != "tensorflow" else "tensorflow")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = randomize_batchnorm(
        ConvMixer(
            dim=8,
            depth=2,
            kernel_size=5,
            patch_size=2,
            num_classes=4,
            input_shape=(None, None, 3),
            include_preprocessing=True,
        )
    )
    model.save_weights(tmp_path / "w.weights.h5")
    x = np.random.default_rng(4).uniform(0, 255, (2, 19, 23, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = _run_clean(
        BACKEND_SCRIPT,
        repo,
        str(tmp_path / "w.weights.h5"),
        str(tmp_path / "x.npy"),
        str(tmp_path / "y.npy"),
        backend=backend,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["backend"] == backend
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(model(x)), atol=1e-5)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: create_model("convmixer_999_9"), ["convmixer_999_9", "convmixer_1536_20"]),
        (lambda: ConvMixer(dim=0, depth=2), ["dim", "positive integer"]),
        (lambda: ConvMixer(dim=-4, depth=2), ["dim", "positive integer"]),
        (
            lambda: ConvMixer(**TINY | {"patch_size": 7}, input_shape=(5, 32, 3)),
            ["patch_size=7", "(5, 32)"],
        ),
        (lambda: ConvMixer(**TINY, activation="swish"), ["activation", "gelu", "relu"]),
        (lambda: ConvMixer(**TINY, pooling="sum"), ["pooling", "avg", "max"]),
        (lambda: ConvMixer(**TINY, pooling=None), ["pooling=None", "include_top=False"]),
        (lambda: ConvMixer(**TINY, input_shape=(32, 32)), ["input_shape", "(height, width, 3)"]),
    ],
)
def test_bad_arguments_raise_value_error(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for word in words:
        assert word in str(err.value)


def test_rebuild_keeps_weights_and_adds_preprocessing():
    model = randomize_batchnorm(ConvMixer(**TINY, input_shape=(None, None, 3), pooling="max"))
    fixed = convmixer_tf.rebuild(
        model, input_shape=(32, 32, 3), preprocessing=(IMAGENET_MEAN, IMAGENET_STD)
    )
    assert fixed.input_shape == (None, 32, 32, 3) and fixed.get_layer("max_pool")
    x = np.random.default_rng(5).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ref = (x / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(
        np.asarray(fixed(x)), np.asarray(model(ref.astype("float32"))), atol=1e-4
    )
    # A model that has the layer keeps its own statistics.
    again = convmixer_tf.rebuild(fixed, input_shape=(64, 64, 3))
    np.testing.assert_allclose(
        np.asarray(again.get_layer("preprocessing").offset),
        np.asarray(fixed.get_layer("preprocessing").offset),
        rtol=1e-6,
    )


def _rewrite_facts(path, change):
    """A copy of the .keras file at `path` whose convmixer.json is `change(stored)`."""
    import zipfile

    with zipfile.ZipFile(path) as source:
        members = {name: source.read(name) for name in source.namelist()}
    stored = json.loads(members["convmixer.json"])
    members["convmixer.json"] = json.dumps(change(stored)).encode()
    copy = f"{path}.rewritten.keras"
    with zipfile.ZipFile(copy, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    return copy


def _version_1(stored, **changes):
    """What version 1 stored: no raw_rgb, pooling, classifier_activation or source."""
    kept = {k: v for k, v in stored.items() if k not in ("raw_rgb", "pooling", "source")}
    kept.pop("classifier_activation")
    return dict(kept, version=1, **changes)


def test_an_earlier_versions_facts_are_completed_from_the_layers(tmp_path):
    model = ConvMixer(**TINY, input_shape=(32, 32, 3), include_preprocessing=True)
    names = tuple("abcdefghij")
    model = attach(model, convmixer_tf.facts_of(model).replace(class_names=names))
    path = str(convmixer_tf.save_model(model, tmp_path / "model.keras"))
    old = convmixer_tf.facts_of(convmixer_tf.load_model(_rewrite_facts(path, _version_1)))
    new = convmixer_tf.facts_of(model)
    # a raw-RGB model's normalisation is read back from its layer, in float32
    np.testing.assert_allclose(old.preprocessing.mean, new.preprocessing.mean, rtol=1e-6)
    np.testing.assert_allclose(old.preprocessing.std, new.preprocessing.std, rtol=1e-6)
    assert old.replace(preprocessing=new.preprocessing) == new
    for change, words in (
        (
            lambda s: dict(s, version=7),
            "has version 7 (this version reads 2, and 1 with the model)",
        ),
        (lambda s: _version_1(s, class_names=["a"]), "cannot read its convmixer.json"),
        (lambda s: dict(s, version=2.0), "has version 2.0 (this version reads 2"),
        (lambda s: dict(_version_1(s), version=True), "has version True (this version reads 2"),
    ):
        with pytest.raises(BadInput, match=re.escape(words)):
            convmixer_tf.load_model(_rewrite_facts(path, change))
