"""The converter meets hostile checkpoints: damaged, empty, huge, foreign, truncated, special
and oddly named files, layouts with one key missing or one shape wrong, two layouts mixed,
tensors that are not weights. Each row promises an exit code and a one-line message, with
nothing written beside the file and nothing from it executed."""

import argparse
import inspect
import io
import json
import os
import pickle
import resource
import struct
import zipfile

import numpy as np
import pytest
from torch_helpers import (
    labml_convmixer,
    one_liner_convmixer,
    save_checkpoint,
    sequential_convmixer,
    timm_convmixer,
    torch,
)

from weights_converter.__main__ import main

MARKER = "PWNED"  # what a file that runs code would create beside itself


def _torch_bytes(obj, legacy=False):
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _safetensors_bytes(tensors):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _good():
    return timm_convmixer().state_dict()


def _safetensors_header(header: dict, payload: bytes, length=None):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


class _System:
    """Unpickling it would run a shell command."""

    def __init__(self, folder):
        self.command = f"touch {os.path.join(folder, MARKER)}"

    def __reduce__(self):
        return (os.system, (self.command,))


def _zip_of(members: dict, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_bomb():
    """torch.save's own members, its pickle padded to 200 MB of zeros and deflated: a file
    of a few hundred kB that asks for 200 MB when read."""
    members = {}
    with zipfile.ZipFile(io.BytesIO(_torch_bytes({"w": torch.zeros(3)}))) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    pickled = next(name for name in members if name.endswith("data.pkl"))
    members[pickled] += b"\0" * (200 << 20)
    return _zip_of(members, zipfile.ZIP_DEFLATED)


def _second_disk():
    """torch.save's zip, its zip64 end locator naming a second disk (zipfile.is_zipfile raises
    on it instead of answering)."""
    data = bytearray(_torch_bytes(_good()))
    at = data.rfind(b"PK\x06\x07")
    data[at + 4 : at + 8] = (1).to_bytes(4, "little")
    return bytes(data)


def _with(tensors, **changes):
    return dict(tensors, **changes)


def _without(tensors, key):
    return {k: v for k, v in tensors.items() if k != key}


# The pointwise convolution of block 1, as each layout names it.
POINTWISE = {
    "timm": (lambda: timm_convmixer().state_dict(), "blocks.1.1.weight"),
    "sequential": (lambda: sequential_convmixer().state_dict(), "4.1.weight"),
    "one_liner": (lambda: one_liner_convmixer(depthwise=True).state_dict(), "2.1.0.weight"),
    "labml": (lambda: labml_convmixer().state_dict(), "conv_mixer_layers.1.point_wise_conv.weight"),
}


def _layout_rows():
    rows = []
    for layout, (weights, key) in POINTWISE.items():
        rows.append(
            (f"{layout}, one key missing", "m.pth", lambda w=weights, k=key: _without(w(), k))
            + (2, f"missing key {key!r}")
        )
        wrong = torch.zeros(16, 16, 3, 3)
        rows.append(
            (
                f"{layout}, one shape wrong",
                "s.pth",
                lambda w=weights, k=key, x=wrong: _with(w(), **{k: x}),
            )
            + (2, f"wrong shape for {key!r}")
        )
    return rows


# name, file name, content (bytes, or a state dict saved with torch.save), exit code, words
ROWS = [
    ("empty torch file", "empty.pth", lambda: b"", 2, "empty (0 bytes)"),
    ("empty safetensors file", "empty.safetensors", lambda: b"", 2, "empty (0 bytes)"),
    ("truncated torch zip", "t.pth", lambda: _torch_bytes(_good())[:3000], 2, "truncated"),
    (
        "truncated legacy pickle",
        "t.bin",
        lambda: _torch_bytes(_good(), True)[:3000],
        2,
        "truncated",
    ),
    (
        "truncated safetensors",
        "t.safetensors",
        lambda: _safetensors_bytes(_good())[:3000],
        2,
        "cannot read safetensors",
    ),
    ("random bytes", "r.pth", lambda: np.random.default_rng(0).bytes(4096), 2, "cannot read torch"),
    (
        "a zip that is not torch's",
        "notes.pth",
        lambda: _zip_of({"notes.txt": b"hello"}),
        2,
        "cannot read torch",
    ),
    ("a zip bomb", "bomb.pth", _zip_bomb, 2, "compressed"),
    ("a zip that spans two disks", "disks.pth", _second_disk, 2, "a damaged zip"),
    (
        "a pickle with a GLOBAL to os.system",
        "evil.pth",
        lambda folder: f"cposix\nsystem\n(Vtouch {folder}/{MARKER}\ntR.".encode(),
        2,
        "posix.system",
    ),
    (
        "torch's zip holding a call to os.system",
        "evil_zip.pth",
        lambda folder: _torch_bytes({"state_dict": _good(), "hook": _System(folder)}),
        2,
        "posix.system",
    ),
    (
        "a pickle with a GLOBAL to builtins.eval",
        "eval.bin",
        lambda folder: f"cbuiltins\neval\n(Vopen('{folder}/{MARKER}', 'w')\ntR.".encode(),
        2,
        "would call `eval`",
    ),
    (
        "safetensors whose header length is past the end",
        "long.safetensors",
        lambda: _safetensors_header({}, b"", length=10_000),
        2,
        "cannot read safetensors",
    ),
    (
        "safetensors with a huge header length",
        "huge.safetensors",
        lambda: _safetensors_header({}, b"", length=1 << 62),
        2,
        "cannot read safetensors",
    ),
    (
        "safetensors whose tensor lies past the end",
        "past.safetensors",
        lambda: _safetensors_header(
            {"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}, b"\0" * 16
        ),
        2,
        "cannot read safetensors",
    ),
    ("JSON named .pth", "config.pth", lambda: b'{"state_dict": {}}', 2, "cannot read torch"),
    (
        "JSON named .safetensors",
        "config.safetensors",
        lambda: b'{"state_dict": {}}',
        2,
        "cannot read safetensors",
    ),
    ("a list", "list.pth", lambda: [torch.zeros(3)], 2, "holds a list, not a dict of tensors"),
    (
        "integer keys",
        "ints.pth",
        lambda: {1: torch.zeros(3)},
        2,
        "top-level keys ['1'], none of state_dict",
    ),
    ("no tensors", "args.pth", lambda: {"epoch": 3, "lr": 0.1}, 2, "holds no state dict"),
    (
        "training args with a shape in a tensor's place",
        "namespace.pth",
        lambda: _with(_good(), **{"head.bias": argparse.Namespace(shape=[10])}),
        2,
        "mixes tensors with non-tensor entries ['head.bias']",
    ),
    (
        "a NaN weight",
        "nan.pth",
        lambda: _with(_good(), **{"blocks.0.1.bias": torch.full((16,), float("nan"))}),
        2,
        "'blocks.0.1.bias' holds 16 non-finite",
    ),
    (
        "an infinite weight in safetensors",
        "inf.safetensors",
        lambda: _safetensors_bytes(
            _with(_good(), **{"head.bias": torch.full((10,), float("inf"))})
        ),
        2,
        "'head.bias' holds 10 non-finite",
    ),
    *_layout_rows(),
    (
        "the last block's depthwise convolution missing",
        "last.pth",
        lambda: {
            k: v
            for k, v in labml_convmixer().state_dict().items()
            if not k.startswith("conv_mixer_layers.1.depth_wise_conv.")
        },
        2,
        "missing key 'conv_mixer_layers.1.depth_wise_conv.weight'",
    ),
    (
        "a block missing whole",
        "gap.pth",
        lambda: {
            k: v for k, v in sequential_convmixer(depth=3).state_dict().items() if k[:2] != "4."
        },
        2,
        "missing key '4.0.fn.0.weight'",
    ),
    (
        "two layouts mixed",
        "mixed.pth",
        lambda: _with(_good(), **{"classification.linear.bias": torch.zeros(10)}),
        2,
        "the keys mix two layouts",
    ),
    (
        "no layout at all",
        "other.pth",
        lambda: {"conv1.weight": torch.zeros(3, 3, 3, 3), "fc.bias": torch.zeros(3)},
        2,
        "none of the layouts tried",
    ),
    (
        "a view that repeats one value 10^10 times",
        "repeat.pth",
        lambda: _with(_good(), **{"stem.0.weight": torch.zeros(1).expand(100000, 3, 200, 200)}),
        2,
        "repeats",
    ),
    (
        "a sparse tensor",
        "sparse.pth",
        lambda: _with(_good(), **{"head.bias": torch.zeros(10).to_sparse()}),
        2,
        "'head.bias' is a sparse tensor",
    ),
    (
        "a quantized tensor",
        "quantized.pth",
        lambda: _with(
            _good(),
            **{"head.bias": torch.quantize_per_tensor(torch.zeros(10), 0.1, 0, torch.qint8)},
        ),
        2,
        "'head.bias' is a quantized tensor",
    ),
    (
        "a tensor without data (meta)",
        "meta.pth",
        lambda: _with(_good(), **{"head.bias": torch.empty(10, device="meta")}),
        2,
        "'head.bias' cannot be read as an array",
    ),
    (
        "complex weights",
        "complex.pth",
        lambda: _with(_good(), **{"head.bias": torch.zeros(10, dtype=torch.complex64)}),
        2,
        "'head.bias' holds complex64",
    ),
    (
        "integer weights",
        "int.pth",
        lambda: _with(_good(), **{"stem.0.bias": torch.zeros(16, dtype=torch.int64)}),
        2,
        "'stem.0.bias' holds int64",
    ),
    (
        "20,000 keys",
        "many.pth",
        lambda: {f"k{i}.weight": torch.zeros(1) for i in range(20_000)},
        2,
        "none of the layouts tried",
    ),
    (
        "a block index of 5,000 digits",
        "deep.pth",
        lambda: _with(_good(), **{f"blocks.{'9' * 5000}.1.weight": torch.zeros(1)}),
        2,
        "unexpected key 'blocks.999",
    ),
    (
        "a key with control characters",
        "escape.pth",
        lambda: _with(_good(), **{"blocks.0.\x1b]0;owned\x07\nforged": torch.zeros(1)}),
        2,
        r"unexpected key 'blocks.0.\x1b]0;owned\x07\nforged'",
    ),
    (
        "a key of 100,000 characters",
        "long_key.pth",
        lambda: _with(_good(), **{"x" * 100_000: torch.zeros(1)}),
        2,
        "unexpected key 'xxx",
    ),
    (
        "a one-channel stem",
        "grey.pth",
        lambda: _with(_good(), **{"stem.0.weight": torch.zeros(16, 1, 2, 2)}),
        2,
        "'stem.0.weight' has 1 input channels",
    ),
    (
        "a non-square stem",
        "wide.pth",
        lambda: _with(_good(), **{"stem.0.weight": torch.zeros(16, 3, 2, 3)}),
        2,
        "'stem.0.weight' has shape (16, 3, 2, 3)",
    ),
    (
        "a head of one dimension",
        "flat_head.pth",
        lambda: _with(_good(), **{"head.weight": torch.zeros(16)}),
        2,
        "'head.weight' has shape (16,), expected (classes, 16)",
    ),
    (
        "no mixer blocks",
        "stem_only.pth",
        lambda: {k: v for k, v in _good().items() if k.startswith("stem.")},
        2,
        "no mixer blocks",
    ),
]


def _write(folder, name, make):
    path = folder / name
    if "folder" in inspect.signature(make).parameters:
        content = make(str(folder))
    else:
        content = make()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def _run(argv, capsys):
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


@pytest.mark.parametrize("name,filename,make,code,words", ROWS, ids=[row[0] for row in ROWS])
def test_a_hostile_checkpoint(tmp_path, capsys, name, filename, make, code, words):
    path = _write(tmp_path, filename, make)
    before = sorted(os.listdir(tmp_path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    got, err, _ = _run(["--torch-ckpt", str(path)], capsys)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 1 << 20, f"{name}: the peak memory grew by {grown >> 10} MiB"
    assert got == code, (name, err[-3000:])
    assert err.startswith("error: ") and len(err.splitlines()) == 1, (name, err[-3000:])
    assert words in err, (name, err)
    assert err.isprintable() and len(err) < 2000, (name, err[:3000])
    assert sorted(os.listdir(tmp_path)) == before, name  # nothing written, no staging left
    assert not (tmp_path / MARKER).exists(), f"{name}: reading the file ran code from it"


def _special_files(folder):
    """name -> (path, words) of files that are not regular files."""
    fifo = folder / "pipe.pth"
    os.mkfifo(fifo)
    (folder / "folder.pth").mkdir()
    (folder / "zero.pth").symlink_to("/dev/zero")
    (folder / "dangling.pth").symlink_to(folder / "nowhere.pth")
    return {
        "a named pipe": (fifo, "not a regular file"),
        "a folder": (folder / "folder.pth", "is a folder"),
        "a device": (folder / "zero.pth", "not a regular file"),
        "a link to nothing": (folder / "dangling.pth", "not found"),
        "an absent file": (folder / "absent.pth", "not found"),
        "an absent file with escapes in its name": (
            folder / "ab\x1b[2Jsent\n.pth",
            "ab\\x1b[2Jsent\\n.pth",
        ),
    }


def test_special_files_are_refused_without_waiting(tmp_path, capsys):
    for name, (path, words) in _special_files(tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        code, err, _ = _run(["--torch-ckpt", str(path)], capsys)
        assert code == 2 and words in err and len(err.splitlines()) == 1, (name, err)
        assert err.isprintable(), (name, err)
        assert sorted(os.listdir(tmp_path)) == before, name


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_checkpoint(tmp_path, capsys):
    path = save_checkpoint(_good(), tmp_path / "locked.pth")
    os.chmod(path, 0)
    code, err, _ = _run(["--torch-ckpt", str(path)], capsys)
    assert code == 2 and "permission denied" in err.lower(), err


ODD_NAMES = {
    "spaces": "my model (final).pth",
    "unicode": "modèle_ü_模型.pth",
    "a leading dash": "-model.pth",
    "escape sequences": "m\x1b]0;title\x07.pth",
    "a newline": "m\nforged row.pth",
    "bytes that are not UTF-8": os.fsdecode(b"m\xff\xfe.pth"),
    "240 characters": "m" * 236 + ".pth",
}


@pytest.mark.parametrize("name", list(ODD_NAMES))
def test_an_oddly_named_checkpoint_converts(tmp_path, capsys, name):
    path = save_checkpoint(_good(), tmp_path / ODD_NAMES[name])
    out = tmp_path / "out"
    code, err, _ = _run(["--torch-ckpt", str(path), "--output", str(out)], capsys)
    assert code == 0, (name, err[-3000:])
    assert sorted(os.listdir(out)) == ["README.md", "RECORD", "model.keras", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["conversion"]["checkpoint"]["path"] == str(path)


@pytest.mark.parametrize("tolerance", ["1e-4", "1e-12"], ids=["converted", "parity failed"])
def test_the_converter_prints_an_odd_name_escaped(tmp_path, capsys, tolerance):
    """The checkpoint's name reaches every line the converter prints (the result, progress,
    the failure's pointer to report.json) as `ls -b` shows it: a name that is not UTF-8 is
    no UnicodeEncodeError on a strict stdout once the output is written, and no newline or
    escape sequence from it reaches the terminal."""
    from convmixer_tf.cli import escaped

    name = os.fsdecode(b"l\xff\n\x1b[31m.pth")
    path = save_checkpoint(_good(), tmp_path / name)
    code = main(["--torch-ckpt", str(path), "--tolerance", tolerance])
    captured = capsys.readouterr()
    assert code == (0 if tolerance == "1e-4" else 1), captured.err[-3000:]
    output = str(tmp_path / os.fsdecode(b"l\xff\n\x1b[31m_keras"))
    assert os.path.isdir(output)
    assert escaped(output) in captured.out, captured.out
    for line in captured.out.splitlines() + captured.err.splitlines():
        assert line.isprintable(), line


def test_a_name_too_long_for_the_default_output_is_refused_in_one_line(tmp_path, capsys):
    path = save_checkpoint(_good(), tmp_path / ("m" * 250 + ".pth"))
    before = sorted(os.listdir(tmp_path))
    code, err, _ = _run(["--torch-ckpt", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--output" in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_pickle_built_by_hand_never_runs(tmp_path, capsys):
    """Every opcode path to a call: REDUCE, BUILD, INST and OBJ of a GLOBAL the unpickler
    does not know."""
    command = f"touch {tmp_path / MARKER}"
    streams = {
        "reduce": pickle.dumps(_System(str(tmp_path)), protocol=2),
        "inst": f"(S'{command}'\nios\nsystem\n.".encode(),
        "obj": b"(cos\nsystem\nS'" + command.encode() + b"'\no.",
        "build": b"cos\nsystem\n)R}b.",
    }
    for name, data in streams.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        code, err, _ = _run(["--torch-ckpt", str(path)], capsys)
        assert code == 2 and len(err.splitlines()) == 1, (name, err)
        path.unlink()
    assert not (tmp_path / MARKER).exists()
