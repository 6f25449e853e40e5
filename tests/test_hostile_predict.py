"""`predict` meets hostile model files and names: facts that disagree with the graph they
ride on, files without a classifier head, truncated, renamed, empty and foreign files of
each format, a model that gives NaN, control characters in names, a closed stdout, 10^9
classes, deep JSON and a zip bomb. Each row: the exit code and the one line promised, no
traceback, no hang. The files are a tiny model's, made once for the module."""

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from conftest import run_with_stdio, write_pngs

from convmixer_tf.predict.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO)
FORMATS = ("model.keras", "model.onnx", "model.tflite", "saved_model")
TINY = dict(dim=8, depth=1, kernel_size=3, patch_size=4, input_shape=(32, 32, 3))


def _export(model, folder, *, tflite_output="probabilities"):
    """model.keras, model.onnx, model.tflite and saved_model/ of `model` in `folder`."""
    import convmixer_tf
    from convmixer_tf.export.onnx import export_onnx
    from convmixer_tf.export.saved_model import export_saved_model
    from convmixer_tf.export.tflite import export_tflite

    folder.mkdir(parents=True, exist_ok=True)
    convmixer_tf.save_model(model, folder / "model.keras")
    export_onnx(model, folder / "model.onnx")
    export_tflite(model, folder / "model.tflite", output=tflite_output)
    export_saved_model(model, folder / "saved_model")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"ours": a 3-class model's four files (its .tflite gives logits), "features": a
    head-less one's (pooling None), "pooled": include_top=False with pooling, "nan": a
    model whose head gives NaN, "images": a folder of PNGs}."""
    import convmixer_tf
    from convmixer_tf.export.tflite import export_tflite

    root = tmp_path_factory.mktemp("hostile")
    ours = convmixer_tf.ConvMixer(num_classes=3, include_preprocessing=True, **TINY)
    nan = convmixer_tf.ConvMixer(num_classes=3, include_preprocessing=True, **TINY)
    kernel, bias = nan.get_layer("head").get_weights()
    nan.get_layer("head").set_weights([kernel, np.full_like(bias, np.nan)])
    features = convmixer_tf.ConvMixer(include_top=False, pooling=None, **TINY)
    pooled = convmixer_tf.ConvMixer(include_top=False, pooling="avg", **TINY)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3))
    _export(ours, root / "ours", tflite_output="logits")
    export_tflite(ours, root / "ours" / "model_int8.tflite", "int8", representative_data=_samples)
    return {
        "ours": root / "ours",
        "features": _export(features, root / "features"),
        "pooled": _export(pooled, root / "pooled"),
        "nan": _export(nan, root / "nan"),
        "images": write_pngs(root / "images", pixels),
    }


def _samples():
    """Calibration images for the int8 file (raw RGB, as the graph takes them)."""
    pixels = np.random.default_rng(2).uniform(0, 255, (4, 1, 32, 32, 3))
    return iter(pixels.astype(np.float32))


# ----------------------------------------------------------- facts in each file, rewritten


def _rewrite_zip(data: bytes, name: str, text: bytes) -> bytes:
    """`data` (a zip archive, or a file with one appended) with member `name` set to
    `text`: the archive is written anew after whatever precedes it."""
    with zipfile.ZipFile(io.BytesIO(data)) as old:
        start = min(info.header_offset for info in old.infolist())
        members = {info.filename: old.read(info) for info in old.infolist()}
    members[name] = text
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as new:
        for member, content in members.items():
            new.writestr(member, content)
    return data[:start] + out.getvalue()


def _facts_of(path) -> bytes:
    path = str(path)
    if path.endswith("saved_model"):
        return open(os.path.join(path, "assets", "convmixer.json"), "rb").read()
    if path.endswith(".onnx"):
        import onnx

        props = onnx.load(path).metadata_props
        return next(p.value for p in props if p.key == "convmixer.json").encode()
    with zipfile.ZipFile(path) as archive:
        return archive.read("convmixer.json")


def with_facts(source, target, text: bytes):
    """A copy of model file `source` at `target` whose facts are `text`."""
    source, target = str(source), str(target)
    if source.endswith("saved_model"):
        shutil.copytree(source, target)
        with open(os.path.join(target, "assets", "convmixer.json"), "wb") as f:
            f.write(text)
    elif source.endswith(".onnx"):
        import onnx

        model = onnx.load(source)
        next(p for p in model.metadata_props if p.key == "convmixer.json").value = text.decode()
        onnx.save(model, target)
    else:
        with open(source, "rb") as f:
            data = _rewrite_zip(f.read(), "convmixer.json", text)
        with open(target, "wb") as f:
            f.write(data)
    return target


def changed(source, target, **changes):
    """`with_facts` with some facts changed: {"num_classes": 10} sets config.num_classes, a
    preprocessing field its own, others the top level."""
    facts = json.loads(_facts_of(source))
    for key, value in changes.items():
        where = next(
            (facts[group] for group in ("config", "preprocessing") if key in facts[group]), facts
        )
        where[key] = value
    return with_facts(source, target, json.dumps(facts).encode())


def _cut(source, target, keep):
    """The first `keep` bytes (a fraction, or a negative count from the end) of a file."""
    data = open(source, "rb").read()
    size = int(len(data) * keep) if 0 < keep < 1 else len(data) + keep
    open(target, "wb").write(data[:size])
    return target


def _foreign_onnx(target, *, image_input, outputs=7, facts=None):
    """An ONNX graph built by hand, not by this project (with our facts pasted in, if given)."""
    import onnx
    from onnx import TensorProto, helper

    shape = [1, 3, 32, 32] if image_input else [1, 12]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])
    nodes = [helper.make_node("Flatten", ["x"], ["f"])]
    weights = np.zeros((int(np.prod(shape[1:])), outputs), np.float32)
    nodes.append(helper.make_node("MatMul", ["f", "w"], ["y"]))
    graph = helper.make_graph(
        nodes, "foreign", [inp], [out], [onnx.numpy_helper.from_array(weights, "w")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if facts is not None:
        model.metadata_props.add(key="convmixer.json", value=facts.decode())
    onnx.save(model, target)
    return target


def _no_serving_default(target):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, target)
    return target


def _without_facts(source, target):
    source, target = str(source), str(target)
    if source.endswith("saved_model"):
        shutil.copytree(source, target)
        os.remove(os.path.join(target, "assets", "convmixer.json"))
    elif source.endswith(".onnx"):
        import onnx

        model = onnx.load(source)
        del model.metadata_props[:]
        onnx.save(model, target)
    else:  # a .tflite file without the archive this project packs at its end
        data = open(source, "rb").read()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            start = min(info.header_offset for info in archive.infolist())
        open(target, "wb").write(data[:start])
    return target


# -------------------------------------------------------------------- the table

MISMATCH = "do not match its layers"  # what saving.load_model says of a .keras file's facts


def _rows():
    """(id, make(files, tmp) -> model path, exit code, words of the one line) per row."""
    rows = []
    for name in FORMATS:
        keras = name == "model.keras"

        def ours(files, tmp, name=name):
            return files["ours"] / name

        facts = [
            ("10-classes", dict(num_classes=10), "say 10 classes, its graph gives 3"),
            ("2-classes", dict(num_classes=2), "say 2 classes, its graph gives 3"),
            ("0-classes", dict(num_classes=0), "gives features, not classes"),
            ("64-px", dict(input_size=64), "its facts say 64 px, its graph takes 32 x 32 px"),
            (
                "softmax",
                dict(classifier_activation="softmax"),
                "ends in a softmax, its graph gives logits",
            ),
            ("rlo-variant", dict(variant="\u202egnp.exe"), "holds the format character U+202E"),
            (
                "zwsp-class",
                dict(class_names=["a", "b\u200b", "c"]),
                "holds the format character U+200B",
            ),
        ]
        facts += [
            ("dim", dict(dim=16), "its facts say dim 16, its graph shows 8"),
            ("patch", dict(patch_size=2), "its facts say patch_size 2, its graph shows 4"),
        ]
        if name == "model.tflite":  # a float graph that normalises raw pixels itself
            facts.append(
                ("raw-rgb", dict(raw_rgb=False), "say raw_rgb False, its graph shows True")
            )
        for label, change, words in facts:
            expected = MISMATCH if keras and "px" not in label and "U+" not in words else words

            def make(files, tmp, name=name, change=change):
                return changed(files["ours"] / name, tmp / name, **change)

            rows.append((f"{name}-{label}", make, 2, expected))
        for head in ("features", "pooled"):
            rows.append(
                (
                    f"{name}-{head}",
                    lambda f, t, h=head, n=name: f[h] / n,
                    2,
                    "gives features, not classes",
                )
            )
        damaged = "truncated or corrupt" if keras else "truncated or damaged"
        if name != "saved_model":
            rows.append(
                (f"{name}-half", lambda f, t, n=name: _cut(ours(f, t, n), t / n, 0.5), 2, damaged)
            )
            rows.append(
                (
                    f"{name}-empty",
                    lambda f, t, n=name: _cut(ours(f, t, n), t / n, -(10**9)),
                    2,
                    "is empty",
                )
            )
        if not keras:
            rows.append(
                (
                    f"{name}-foreign",
                    lambda f, t, n=name: _without_facts(ours(f, t, n), t / n),
                    2,
                    "holds no convmixer.json: not written by this project",
                )
            )
    rows += [
        (
            "tflite-cut-in-its-archive",
            lambda f, t: _cut(f["ours"] / "model.tflite", t / "m.tflite", -30),
            2,
            "truncated or damaged",
        ),
        (
            "keras-renamed-tflite",
            lambda f, t: _copy(f["ours"] / "model.keras", t / "m.tflite"),
            2,
            "truncated or damaged",
        ),
        (
            "tflite-renamed-onnx",
            lambda f, t: _copy(f["ours"] / "model.tflite", t / "m.onnx"),
            2,
            "truncated or damaged",
        ),
        (
            "onnx-renamed-keras",
            lambda f, t: _copy(f["ours"] / "model.onnx", t / "m.keras"),
            2,
            "truncated or corrupt",
        ),
        ("saved-model-pb-cut", lambda f, t: _cut_saved_model(f, t), 2, "truncated or damaged"),
        (
            "saved-model-no-serving-default",
            lambda f, t: _no_serving_default(t / "sm"),
            2,
            "no serving_default",
        ),
        (
            "foreign-onnx-with-our-facts",
            lambda f, t: _foreign_onnx(
                t / "f.onnx", image_input=False, facts=_facts_of(f["ours"] / "model.onnx")
            ),
            2,
            "not a batch of float32 images",
        ),
        (
            "foreign-image-onnx-with-our-facts",
            lambda f, t: _foreign_onnx(
                t / "f.onnx", image_input=True, facts=_facts_of(f["ours"] / "model.onnx")
            ),
            2,
            "say 3 classes, its graph gives 7",
        ),
        (
            "foreign-image-onnx",
            lambda f, t: _foreign_onnx(t / "f.onnx", image_input=True),
            2,
            "holds no convmixer.json: not written by this project",
        ),
        (
            "a-folder-named-onnx",
            lambda f, t: _mkdir(t / "x.onnx"),
            2,
            "is not a model file this project writes",
        ),
        ("a-fifo-named-onnx", lambda f, t: _fifo(t / "x.onnx"), 2, "is not a regular file"),
        (
            "int8-tflite-raw-rgb",  # its uint8 input takes raw pixels
            lambda f, t: changed(f["ours"] / "model_int8.tflite", t / "m.tflite", raw_rgb=False),
            2,
            "its facts say raw_rgb False, its graph shows True",
        ),
        (
            "onnx-its-runtime-cannot-run",
            lambda f, t: _unrunnable_onnx(f, t / "m.onnx"),
            2,
            "m.onnx: its runtime cannot run its graph: [ONNXRuntimeError]",
        ),
        *_label_rows(),
        *_saved_model_member_rows(),
    ]
    return rows


def _label_rows():
    """A .tflite whose labels.txt (what MediaPipe, the page and phone apps show) and whose
    facts' class names (what predict shows) differ."""

    def labelled(files, tmp, labels, names):
        data = (files["ours"] / "model_int8.tflite").read_bytes()
        if labels is not None:
            data = _rewrite_zip(data, "labels.txt", labels)
        facts = json.loads(_facts_of(files["ours"] / "model_int8.tflite"))
        data = _rewrite_zip(
            data, "convmixer.json", json.dumps(dict(facts, class_names=names)).encode()
        )
        (tmp / "m.tflite").write_bytes(data)
        return tmp / "m.tflite"

    cases = [
        (
            "differ",
            b"cat\ndog\nbird\n",
            ["cat", "dog", "ship"],
            "class 2 is 'bird' in its labels.txt",
        ),
        ("count", b"cat\ndog\n", ["cat", "dog", "ship"], "names 2 classes, its convmixer.json 3"),
        (
            "no-names",
            b"cat\ndog\nbird\n",
            None,
            "packs a labels.txt and its convmixer.json names no",
        ),
        ("no-labels", None, ["cat", "dog", "ship"], "names its classes and it packs no labels.txt"),
    ]
    return [
        (f"tflite-labels-{label}", lambda f, t, a=labels, b=names: labelled(f, t, a, b), 2, words)
        for label, labels, names, words in cases
    ]


def _saved_model_member_rows():
    """A SavedModel whose members TensorFlow reads are FIFOs (its read would block forever)
    or links out of the folder."""

    def damaged(files, tmp, member, make):
        shutil.copytree(files["ours"] / "saved_model", tmp / "sm")
        os.remove(tmp / "sm" / member)
        make(files, tmp / "sm" / member)
        return tmp / "sm"

    def link(files, path):
        os.symlink(files["ours"] / "saved_model" / os.path.relpath(path, path.parents[1]), path)

    variables = "variables/variables.index", "variables/variables.data-00000-of-00001"
    members = [*variables, "assets/convmixer.json", "fingerprint.pb", "saved_model.pb"]
    rows = [
        (
            f"saved-model-fifo-{m}",
            lambda f, t, m=m: damaged(f, t, m, lambda _, p: os.mkfifo(p)),
            2,
            f"sm/{m} is not a regular file",
        )
        for m in members
    ]
    rows.append(
        (
            "saved-model-link-out",
            lambda f, t: damaged(f, t, variables[0], link),
            2,
            "variables.index is a link",
        )
    )
    return rows


def _unrunnable_onnx(files, target):
    """An ONNX graph onnxruntime loads but cannot run: a Reshape of 3 values to [-1, 7]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 32, 32, 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Reshape", ["m", "s"], ["logits"]),
    ]
    shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "s")
    graph = helper.make_graph(nodes, "g", [images], [logits], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model.metadata_props.add(
        key="convmixer.json", value=_facts_of(files["ours"] / "model.onnx").decode()
    )
    onnx.save(model, target)
    return target


def _copy(source, target):
    shutil.copy(source, target)
    return target


def _mkdir(path):
    path.mkdir()
    return path


def _fifo(path):
    os.mkfifo(path)
    return path


def _cut_saved_model(files, tmp):
    shutil.copytree(files["ours"] / "saved_model", tmp / "sm")
    _cut(tmp / "sm" / "saved_model.pb", tmp / "sm" / "saved_model.pb", 0.5)
    return tmp / "sm"


ROWS = _rows()


@pytest.mark.parametrize("make, code, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_hostile_model_files(files, tmp_path, capsys, make, code, words):
    model = make(files, tmp_path)
    assert main(["--model", str(model), files["images"]]) == code
    out, err = capsys.readouterr()
    *opened, last = err.strip().splitlines()
    assert out == "" and "Traceback" not in err, err  # no result, no traceback
    assert last.startswith("error: ") and words in last, last
    # the one line; a graph its runtime cannot run shows on the first batch, after the line
    # that names the file opened
    assert opened == [] or ("runtime cannot run" in words and len(opened) == 1), opened


def _run(argv, *, timeout=120, **popen):
    """predict in a process of its own: (exit code, stdout, stderr, its peak memory in MB)."""
    probe = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True); "
        "sys.stdout.buffer.write(done.stdout); sys.stderr.buffer.write(done.stderr); "
        "sys.stderr.write(f'\\nMAXRSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
        "sys.exit(done.returncode)"
    )
    command = [sys.executable, "-c", probe, sys.executable, "-m", "convmixer_tf.predict", *argv]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=ENV, preexec_fn=_limited
    )
    err, _, peak = done.stderr.rpartition("\nMAXRSS ")
    return done.returncode, done.stdout, err, int(peak) / 1024


def _limited():
    """A child's memory, capped: what these rows guard against would otherwise take the
    machine (10^9 class names, 65 images of 4096 px ahead of the model)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


LIMIT = 6 * 2**30


def _packed(files, tmp, text: bytes, compress=zipfile.ZIP_DEFLATED):
    """Our .tflite file with its packed convmixer.json replaced by `text`."""
    data = open(files["ours"] / "model.tflite", "rb").read()
    with zipfile.ZipFile(io.BytesIO(data)) as old:
        start = min(info.header_offset for info in old.infolist())
        kept = {i.filename: old.read(i) for i in old.infolist() if i.filename != "convmixer.json"}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compress) as new:
        for name, content in kept.items():
            new.writestr(name, content)
        with new.open("convmixer.json", "w", force_zip64=True) as member:
            for chunk in text if isinstance(text, list) else [text]:
                member.write(chunk)
    (tmp / "m.tflite").write_bytes(data[:start] + out.getvalue())
    return tmp / "m.tflite"


def test_a_zip_bomb_in_the_facts_is_refused_before_it_is_read(files, tmp_path):
    """A .tflite of 1 MB whose packed convmixer.json inflates to 256 MB: refused from the
    size the archive gives, in a process that never grows by that much."""
    bomb = [b" " * 2**20] * 256
    model = _packed(files, tmp_path, bomb)
    assert model.stat().st_size < 2 * 2**20
    code, out, err, peak = _run(["--model", str(model), files["images"]])
    assert code == 2 and "inflates to more than 4194304 bytes" in err, err
    assert err.count("\n") == 1 and peak < 256, (err, peak)


@pytest.mark.parametrize("where", ["model.onnx", "model.tflite"])
def test_facts_nested_200000_deep_are_bad_input(files, tmp_path, where):
    deep = b'{"version": 2, "config": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    model = with_facts(files["ours"] / where, tmp_path / where, deep)
    code, out, err, _ = _run(["--model", str(model), files["images"]])
    assert code == 2 and "nests deeper than 16 levels" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("model.onnx", dict(num_classes=10**9), "say 1000000000 classes, its graph gives 3"),
        ("model.tflite", dict(num_classes=10**9), "say 1000000000 classes, its graph gives 3"),
        ("model.onnx", dict(input_size=4096), "say 4096 px, its graph takes 32 x 32 px"),
        ("model.keras", dict(input_size=4096), "say 4096 px, its graph takes 32 x 32 px"),
    ],
)
def test_facts_at_their_limits_are_refused_at_once(files, tmp_path, name, change, words):
    """10^9 classes (no name is built for them) and 4096 px, the largest input allowed
    (no image is loaded for it), on a 3-class 32 px graph."""
    model = changed(files["ours"] / name, tmp_path / name, **change)
    code, out, err, peak = _run(["--model", str(model), files["images"]], timeout=120)
    assert code == 2 and words in err and err.count("\n") == 1 and peak < 1500, (err, peak)


def test_a_fifo_given_as_the_model_or_an_image_does_not_block(files, tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    os.mkfifo(tmp_path / "photo.png")
    for argv, words in [
        (["--model", str(tmp_path / "model.onnx"), files["images"]], "is not a regular file"),
        (
            ["--model", str(files["ours"] / "model.onnx"), str(tmp_path / "photo.png")],
            "not a regular file or a folder",
        ),
    ]:
        code, out, err, _ = _run(argv, timeout=60)
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_nan_scores_are_a_failure_named_per_image(files, capsys):
    images = sorted(os.listdir(files["images"]))
    argv = ["--model", str(files["nan"] / "model.onnx"), files["images"], "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no NaN reaches stdout, as JSON or at all
    named = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert [line.split(": ")[1] for line in named] == [
        os.path.join(files["images"], name) for name in images
    ]
    assert all(line.endswith("no scores: the model gave NaN or infinity for it") for line in named)
    assert (
        err.splitlines()[-1]
        == f"error: {len(images)} of {len(images)} images could not be classified (named above)"
    )


def test_json_lines_are_strict_json(files, capsys):
    assert main(["--model", str(files["ours"] / "model.tflite"), files["images"], "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line in lines:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


def test_top_k_beyond_the_classes_shows_every_class(files, capsys):
    argv = ["--model", str(files["ours"] / "model.onnx"), files["images"], "--top-k", "50"]
    assert main(argv + ["--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * (1 + 3)


ODD = [
    "new\nline.png",
    "esc\x1b]0;pwned\x07.png",
    "\u202egnp.exe.png",
    "back\\slash.png",
    "tab\t.png",
]


def test_control_characters_in_names_are_escaped(files, tmp_path, capsys):
    """A newline in a name forges no row, an escape sequence never reaches the terminal, a
    right-to-left override reorders nothing: each shows as `ls -b` shows it."""
    pixels = np.random.default_rng(1).integers(0, 256, (len(ODD), 40, 40, 3))
    folder = write_pngs(tmp_path / "odd\x1b[2J", pixels, names=ODD)
    model = shutil.copy(files["ours"] / "model.onnx", tmp_path / "m\x1b[31m.onnx")
    assert main(["--model", str(model), folder, "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert not any(c in text for c in "\x1b\x07\u202e\t"), repr(text)
    shown = out.splitlines()[::2]
    escaped = folder.replace("\x1b", "\\x1b")
    assert sorted(shown) == sorted(
        os.path.join(escaped, n)
        for n in [
            "new\\nline.png",
            "esc\\x1b]0;pwned\\x07.png",
            "\\u202egnp.exe.png",
            "back\\\\slash.png",
            "tab\\t.png",
        ]
    )
    assert err.splitlines()[0].startswith(str(tmp_path / "m\\x1b[31m.onnx"))
    assert main(["--model", str(tmp_path / "gone\x1b[2J.onnx"), folder]) == 2
    assert capsys.readouterr().err == f"error: model not found: {tmp_path}/gone\\x1b[2J.onnx\n"


def test_a_name_that_is_not_utf8_is_shown_by_its_bytes(files, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_pngs(folder, np.zeros((1, 40, 40, 3)))
    os.rename(folder / "000.png", os.path.join(os.fsencode(folder), b"\xff.png"))
    assert main(["--model", str(files["ours"] / "model.onnx"), str(folder), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{folder}/\\xff.png"


def _grey_png(path, width: int, height: int):
    """A grey PNG of any size, row by row (zlib streams it): 80 KB for 8192 x 8192."""
    packer = zlib.compressobj(9)
    rows = [packer.compress(b"\0" + b"\x80" * width) for _ in range(height)]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IDAT", b"".join(rows) + packer.flush()), (b"IEND", b"")]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        for kind, data in chunks:
            crc = struct.pack(">I", zlib.crc32(kind + data))
            f.write(struct.pack(">I", len(data)) + kind + data + crc)
    return str(path)


@pytest.mark.slow  # five decodes of 8192 x 8192: about 10 s here
def test_the_loaders_decode_one_image_at_the_limit_at_a_time(files, tmp_path):
    """Four images at the pixel limit take about what one takes: the two loader threads
    decoded two at once (727 MB against 400 MB for one, measured here)."""
    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(4):
        _grey_png(folder / f"{i}.png", 8192, 8192)
    model = ["--model", str(files["ours"] / "model.onnx"), "--top-k", "1", "--quiet"]
    code, _, err, one = _run([*model, str(folder / "0.png")])
    assert code == 0, err
    code, out, err, four = _run([*model, str(folder)])
    assert code == 0 and out.count(".png") == 4, err
    assert four < one + 128, (one, four)


def test_json_gives_a_name_that_is_not_utf8_as_ls_shows_it_and_its_bytes(files, tmp_path, capsys):
    """A lone surrogate escape (`\\udcff`) is not Unicode: strict parsers refuse it, and jq
    turns it into U+FFFD. The name is the text `ls -b` shows, its bytes in base64 beside it."""
    folder = tmp_path / "photos"
    write_pngs(folder, np.zeros((2, 40, 40, 3)), names=["caf\xe9.png", "n.png"])
    os.rename(folder / "n.png", os.path.join(os.fsencode(folder), b"n\xff\\.png"))
    assert main(["--model", str(files["ours"] / "model.onnx"), str(folder), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not any("\\ud" in line for line in lines), lines
    rows = sorted((json.loads(line) for line in lines), key=lambda row: row["image"])
    assert rows[0]["image"] == f"{folder}/caf\xe9.png" and "image_base64" not in rows[0]
    assert rows[1]["image"] == f"{folder}/n\\xff\\\\.png"
    assert base64.b64decode(rows[1]["image_base64"]) == os.fsencode(folder) + b"/n\xff\\.png"


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_closed_stdout_is_a_quiet_end(files, flags):
    """`predict ... | head -1`, the reader gone before the first line: exit 141 (what a shell
    reports for a process SIGPIPE ended), and nothing on stderr but the command's own lines."""
    read, write = os.pipe()
    os.close(read)
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.predict",
        "--model",
        str(files["ours"] / "model.onnx"),
    ]
    with subprocess.Popen(
        [*command, files["images"], *flags],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    ) as process:
        os.close(write)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err
    assert "Broken pipe" not in err and "Exception" not in err and "error" not in err, err


def _predict(files, *args):
    command = [sys.executable, "-m", "convmixer_tf.predict", "--model"]
    return [*command, str(files["ours"] / "model.onnx"), files["images"], *args]


def test_stdout_closed_before_the_start_is_a_reader_already_gone(files):
    """`predict ... >&-`: the first result ends the run, quietly, as `| head -0` would (141);
    it used to end in an AttributeError's traceback (exit 3)."""
    code, _, err = run_with_stdio(_predict(files), stdout="closed", env=ENV)
    assert code == 141, err
    assert "Traceback" not in err and "error" not in err, err


@pytest.mark.parametrize("bad", [False, True], ids=["all classified", "one unreadable"])
def test_stderr_closed_is_silence_and_the_exit_code_tells(files, tmp_path, bad):
    """`predict --json ... 2>&-`: stdout holds the JSON lines and nothing else (no progress,
    warning or error line falls back to it), and the exit code is the run's own: 0 when
    every image was classified (it was 1: the console's flush failed), 1 when one was not."""
    images = [files["images"], *([str(_copy_bytes(tmp_path / "bad.png", b"not a png"))] * bad)]
    command = _predict(files, "--json")
    command[-2:-1] = images
    code, out, _ = run_with_stdio(command, stderr="closed", env=ENV)
    assert code == int(bad)
    lines = out.splitlines()
    assert len(lines) == 4 and all(json.loads(line)["top"] for line in lines), out


def test_stdout_on_a_full_disk_is_exit_2_in_one_line(files):
    """`predict ... > /dev/full`: the error says so, and the exit code stays 2 (Python's own
    flush at exit made it 120)."""
    code, _, err = run_with_stdio(_predict(files), stdout="full", env=ENV)
    assert code == 2, err
    assert err.splitlines()[-1] == (
        "error: cannot write the results to stdout: No space left on device"
    ), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def _copy_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_a_model_whose_name_is_not_utf8_is_opened(files, tmp_path, capsys, name):
    """`m\\xff.onnx`: the runtimes (C++ behind pybind11) refuse the surrogate escapes Python
    holds such a name in; the file is opened by its bytes, and classified."""
    stem, dot, end = name.rpartition(".")
    target = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"m\xff" + (dot + end).encode()))
    copy = shutil.copytree if name == "saved_model" else shutil.copy
    copy(files["ours"] / name, target)
    assert main(["--model", target, files["images"], "--top-k", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.count("class ") == 4 and "Traceback" not in err, err


def test_a_keras_file_declaring_more_weights_than_it_holds_is_refused_before_keras_builds_it(
    files, tmp_path
):
    """A 57 KB .keras file whose config.json gives its head 10,000,000 units: Keras would
    allocate and initialise 80 million weights (1.7 GB here, 13 GB for 75,000,000) before
    reading one; refused from its config, in a process that never grows by that much."""
    with zipfile.ZipFile(files["ours"] / "model.keras") as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    config = json.loads(members["config.json"])
    head = next(layer for layer in config["config"]["layers"] if layer["name"] == "head")
    head["config"]["units"] = 10_000_000
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "bomb.keras", "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    code, out, err, peak = _run(["--model", str(tmp_path / "bomb.keras"), files["images"]])
    words = "declares 90,000,640 weights (layer 'head' 90,000,000), more than its model.weights.h5"
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert peak < 1000, peak
