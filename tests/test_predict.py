"""Classifying images with any file this project writes: every file describes itself (its
preprocessing and class names travel inside it, also when it is copied alone), all eight
files of a trained model agree with model.keras on real held-out images (scikit-learn's
digits), and the command line reads as it promises (a table, JSON lines, unreadable images
named, exit codes)."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import DIGIT_NAMES, write_pngs

from convmixer_tf.export import registry
from convmixer_tf.predict import Classifier, classify
from convmixer_tf.predict.__main__ import main

HELD_OUT = 200  # held-out digits each file classifies
FILES = ["model.keras", *(fmt.filename for fmt in registry.BUILT_IN)]


@pytest.fixture(scope="module")
def held_out(digits, tmp_path_factory):
    """Held-out digits as PNG files (the model never saw them): (folder, labels)."""
    images, labels = digits["held_out"]
    return write_pngs(tmp_path_factory.mktemp("held_out"), images[:HELD_OUT]), labels[:HELD_OUT]


@pytest.fixture(scope="module")
def scores(trained, exported, held_out):
    """{file: the probabilities it gives each held-out image, every class}."""
    folder, _ = held_out
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    found = {}
    for name in FILES:
        model = trained["path"] if name == "model.keras" else exported / name
        results = list(classify(Classifier(model), paths, top_k=len(DIGIT_NAMES)))
        assert [r.image for r in results] == paths and not [r for r in results if r.error]
        found[name] = np.array([[dict(r.top)[n] for n in DIGIT_NAMES] for r in results])
    return found


@pytest.mark.parametrize("name", FILES[1:])
def test_every_file_agrees_with_model_keras_on_held_out_digits(scores, held_out, name):
    fmt = {f.filename: f for f in registry.BUILT_IN}[name]
    keras, file = scores["model.keras"], scores[name]
    agreement = np.mean(file.argmax(1) == keras.argmax(1))
    if fmt.tolerance is None:  # quantised
        assert agreement >= 0.97, (name, agreement)
    else:
        assert agreement >= 0.99 and np.abs(file - keras).max() <= fmt.tolerance, (name, agreement)
    assert np.mean(keras.argmax(1) == held_out[1]) >= 0.95  # the digits it should see


@pytest.mark.parametrize("name", ["model_int8.tflite", "model_int8.onnx", "saved_model"])
def test_a_file_copied_alone_still_gives_names(exported, held_out, tmp_path, name):
    alone = tmp_path / "elsewhere" / name
    copy = shutil.copytree if os.path.isdir(exported / name) else shutil.copy
    alone.parent.mkdir()
    copy(exported / name, alone)
    classifier = Classifier(alone)
    assert classifier.names == DIGIT_NAMES and classifier.info.preprocessing.input_size == 32
    image = os.path.join(held_out[0], "000.png")
    assert next(classify(classifier, [image])).top[0][0] == DIGIT_NAMES[held_out[1][0]]


def test_the_command_prints_a_table_or_json_lines(exported, held_out, capsys):
    """Its defaults, in a process of its own: the table on stdout; on stderr its own lines
    only (what it opened, the timing), none of TensorFlow's or onnxruntime's."""
    folder = held_out[0]
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.predict",
        "--model",
        str(exported / "model.onnx"),
    ]
    done = subprocess.run([*command, folder, "--top-k", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.splitlines()
    assert table[0] == os.path.join(folder, "000.png") and len(table) == 4 * HELD_OUT
    assert table[1].strip().endswith(f"%  {DIGIT_NAMES[held_out[1][0]]}")
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 2 and said[0].startswith(str(exported / "model.onnx")), said
    assert re.fullmatch(rf"classified {HELD_OUT} images in [\d.]+ s \([\d.]+ images/s\)", said[1])
    assert main(["--model", str(exported / "model.tflite"), folder, "--json", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (
        len(lines) == HELD_OUT and set(lines[0]) == {"image", "top"} and len(lines[0]["top"]) == 5
    )
    top = lines[0]["top"]
    assert set(top[0]) == {"name", "score"} and top[0]["score"] >= top[1]["score"] >= 0
    assert sum(item["score"] for item in top) <= 1.0 + 1e-6  # probabilities


def test_unreadable_images_are_named_and_the_rest_classified(exported, held_out, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(held_out[0], folder)
    (folder / "sub").mkdir()
    shutil.copy(folder / "001.png", folder / "sub" / "again.png")
    (folder / "broken.png").write_text("<html>404</html>")
    (folder / "truncated.png").write_bytes((folder / "002.png").read_bytes()[:60])
    assert (
        main(["--model", str(exported / "model_int8.onnx"), str(folder), "--json", "--quiet"]) == 1
    )
    out, err = capsys.readouterr()
    images = [json.loads(line)["image"] for line in out.splitlines()]
    assert len(images) == HELD_OUT + 1 and str(folder / "sub" / "again.png") in images
    named = [line for line in err.splitlines() if line.startswith("warning: cannot read image")]
    assert sorted(line.split()[4].rstrip(":") for line in named) == [
        str(folder / "broken.png"),
        str(folder / "truncated.png"),
    ]
    assert err.splitlines()[-1] == "error: 2 of 203 images could not be read (named above)"


@pytest.mark.parametrize(
    "model,image,words",
    [
        ("absent.onnx", "000.png", "model not found"),
        ("exported", "000.png", "holds several model files"),
        ("model.onnx", "absent.png", "image not found"),
        ("notes.txt", "000.png", "is not a model file this project writes"),
    ],
)
def test_bad_arguments_are_exit_2(exported, held_out, tmp_path, capsys, model, image, words):
    (tmp_path / "notes.txt").write_text("mine")
    models = {
        "exported": exported,
        "model.onnx": exported / "model.onnx",
        "notes.txt": tmp_path / "notes.txt",
    }
    argv = ["--model", str(models.get(model, tmp_path / model)), os.path.join(held_out[0], image)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
