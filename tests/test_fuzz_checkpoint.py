"""Properties of the readers of outside data on the converter's path: checkpoint bytes
(torch's zip and legacy pickle through weights_only, safetensors), the state dict inside
(layouts, shapes, dtypes), and a Hub repo's config.json. Whatever the input, a reader gives
a valid result or BadInput with a one-line message: never another exception, and within
bounded time and memory. A few hundred examples each in the fast set, more in the slow."""

import argparse
import contextlib
import datetime
import io
import json
import os
import resource
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch_helpers import torch

from convmixer_tf.errors import BadInput
from weights_converter import hub, layouts, mapping
from weights_converter.checkpoint import read_checkpoint

# torch warns of pickle protocols and sparse tensors it meets in the generated files
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = 200
SLOW = 3000
DEADLINE = datetime.timedelta(seconds=3)
MEMORY = 512 << 20  # bytes the peak may grow by over one property's run


def _settings(examples):
    return settings(
        max_examples=examples,
        deadline=DEADLINE,
        derandomize=examples <= FAST,  # the fast set the same at every run, the slow set anew
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
    assert grown < MEMORY, f"the peak memory grew by {grown >> 20} MiB"


def _one_line(err):
    text = str(err)
    assert "\n" not in text and text.isprintable() and len(text) < 2000, text[:3000]


# ------------------------------------------------------------------ checkpoint bytes

SAMPLE = {
    "stem.0.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2),
    "stem.2.running_var": torch.ones(2, dtype=torch.float16),
    "stem.2.num_batches_tracked": torch.tensor(7),
}


def _torch_bytes(obj, legacy=False):
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _safetensors_bytes(tensors):
    from safetensors.torch import save

    return save(tensors)


SEEDS = {
    "torch zip": (_torch_bytes(SAMPLE), ".pth"),
    "legacy pickle": (_torch_bytes({"state_dict": SAMPLE, "epoch": 3}, legacy=True), ".bin"),
    "safetensors": (_safetensors_bytes(SAMPLE), ".safetensors"),
}


@st.composite
def mutated(draw, seed: bytes):
    """`seed` with a few bytes replaced, a run inserted or removed, and maybe cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        del data[at : at + draw(st.integers(0, 256))]
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def _read(folder, data: bytes, suffix: str):
    """read_checkpoint of `data` saved under a name of its own (an earlier file may still be
    mapped into memory: it is never overwritten)."""
    handle, path = tempfile.mkstemp(suffix=suffix, dir=folder)
    with os.fdopen(handle, "wb") as f:
        f.write(data)
    try:
        checkpoint = read_checkpoint(path)
    except BadInput as err:
        _one_line(err)
        return None
    finally:
        os.remove(path)
    for key, value in checkpoint.state_dict.items():
        assert isinstance(key, str) and isinstance(value, np.ndarray), (key, type(value))
    return checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


def _bytes_property(folder, examples, strategy, suffix):
    @_settings(examples)
    @given(data=strategy)
    def check(data):
        _read(folder, data, suffix)

    with bounded_memory():
        check()


BYTES = {
    "any bytes as .pth": (st.binary(max_size=4096), ".pth"),
    "any bytes as .safetensors": (st.binary(max_size=4096), ".safetensors"),
    **{f"a damaged {name}": (mutated(seed), suffix) for name, (seed, suffix) in SEEDS.items()},
}


@pytest.mark.parametrize("name", list(BYTES))
def test_checkpoint_bytes(folder, name):
    _bytes_property(folder, FAST, *BYTES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BYTES))
def test_checkpoint_bytes_many(folder, name):
    _bytes_property(folder, SLOW, *BYTES[name])


def test_the_seeds_are_read_whole(folder):
    """The damaged files start from files the reader takes: the property is not vacuous."""
    for name, (seed, suffix) in SEEDS.items():
        checkpoint = _read(folder, seed, suffix)
        assert checkpoint is not None and len(checkpoint.state_dict) == 3, name


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", ""]


@st.composite
def safetensors_files(draw):
    """A safetensors header of hypothesis' making (dtypes, shapes and offsets that may lie,
    metadata of any kind) before a payload of any length."""
    names = draw(st.lists(st.text(max_size=12), max_size=4, unique=True))
    header = {}
    for name in names:
        header[name] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.lists(st.integers(-2, 1 << 40), max_size=4)),
            "data_offsets": draw(st.lists(st.integers(-2, 1 << 40), min_size=2, max_size=3)),
        }
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), st.integers(0, (1 << 64) - 1)))
    payload = draw(st.binary(max_size=512))
    return struct.pack("<Q", length) + text + payload


def _safetensors_property(folder, examples):
    zero_elements_too_big = {"": {"dtype": "F32", "shape": [0, 2192, 8728907, 121003681]}}
    zero_elements_too_big[""]["data_offsets"] = [0, 0]  # numpy: "array is too big"
    header = json.dumps(zero_elements_too_big).encode()

    @_settings(examples)
    @given(data=safetensors_files())
    @example(data=struct.pack("<Q", len(header)) + header)
    def check(data):
        _read(folder, data, ".safetensors")

    with bounded_memory():
        check()


def test_safetensors_headers(folder):
    _safetensors_property(folder, FAST)


@pytest.mark.slow
def test_safetensors_headers_many(folder):
    _safetensors_property(folder, SLOW)


TENSORS = st.sampled_from(
    [
        torch.zeros(2, 3),
        torch.ones(4, dtype=torch.float16),
        torch.ones(2, dtype=torch.bfloat16),
        torch.arange(3),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(()),
        torch.zeros(0, 3),
        torch.zeros(1).expand(1000, 1000),
        torch.zeros(3, 4).t(),
        torch.zeros(4).to_sparse(),
        torch.empty(2, device="meta"),
        argparse.Namespace(shape=(2,)),  # timm's training args, which the unpickler builds
    ]
)
PICKLED = st.one_of(
    st.dictionaries(st.text(max_size=12), TENSORS, min_size=1, max_size=4),  # a state dict
    st.recursive(
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), TENSORS
        ),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.tuples(inner, inner),
            st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4),
        ),
        max_leaves=12,
    ),
)


def _pickled_property(folder, examples):
    @_settings(examples)
    @given(obj=PICKLED, legacy=st.booleans())
    def check(obj, legacy):
        _read(folder, _torch_bytes(obj, legacy), ".pth")

    with bounded_memory():
        check()


def test_whatever_torch_save_wrote(folder):
    """Structures of any shape around tensors of any kind, as torch.save writes them."""
    _pickled_property(folder, FAST)


@pytest.mark.slow
def test_whatever_torch_save_wrote_many(folder):
    _pickled_property(folder, SLOW)


# ------------------------------------------------------------------ the state dict inside

PARTS = [
    "stem",
    "blocks",
    "head",
    "fn",
    "patch_emb",
    "conv",
    "norm",
    "conv_mixer_layers",
    "depth_wise_conv",
    "point_wise_conv",
    "norm1",
    "norm2",
    "classification",
    "linear",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "99999999999",
    "",
]
WEIGHTS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
KEYS = st.builds(
    lambda parts, weight: ".".join([*parts, weight]),
    st.lists(st.sampled_from(PARTS), max_size=5),
    st.sampled_from(WEIGHTS),
)
ARRAYS = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=4).map(tuple),
    st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.complex64]),
    st.sampled_from([0.5, 0.0, float("nan"), float("inf")]),
)


def _state_dict_property(examples):
    @_settings(examples)
    @given(state_dict=st.dictionaries(KEYS, ARRAYS, max_size=24))
    def check(state_dict):
        """The converter's checks before any Keras model is built: the layout, finite values,
        the config from shapes, the plan of every weight."""
        try:
            canonical, layout = layouts.to_canonical(state_dict)
            mapping.check_finite(state_dict)
            config = mapping.infer_config(state_dict, layout=layout)
            rows = mapping.plan(canonical, config, mapping.has_head(canonical), layout=layout)
        except BadInput as err:
            _one_line(err)
            return
        assert rows and all(row.key in canonical for row in rows)

    with bounded_memory():
        check()


def test_state_dicts():
    _state_dict_property(FAST)


@pytest.mark.slow
def test_state_dicts_many():
    _state_dict_property(SLOW)


# ------------------------------------------------------------------ a Hub repo's config.json

FIELDS = [
    "pretrained_cfg",
    "label_names",
    "architecture",
    "input_size",
    "mean",
    "std",
    "crop_pct",
    "interpolation",
    "license",
    "num_classes",
]
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from([3, 224, 0.875, "bicubic", "mit"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), inner, max_size=6),
    ),
    max_leaves=25,
)
TEXTS = st.one_of(
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=512),
    st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 100_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
)


def _config_property(examples):
    @_settings(examples)
    @given(data=TEXTS)
    @example(data=b"[" * 200_000)
    @example(data=json.dumps({"pretrained_cfg": [[[[[[[[[[1]]]]]]]]]]}).encode())
    def check(data):
        """config.json's bytes, then each field read, as `hub.resolve` reads them."""
        try:
            config = hub.parse_config(data, "config.json of hf-hub:someone/repo")
            cfg = hub.pretrained_cfg("model.safetensors", repo="someone/repo", config=config)
        except BadInput as err:
            _one_line(err)
            return
        assert set(cfg) == {"preprocessing", "class_names", "source"}

    with bounded_memory():
        check()


def test_hub_config_json():
    _config_property(FAST)


@pytest.mark.slow
def test_hub_config_json_many():
    _config_property(SLOW)
