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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = 200  # held-out digits each file classifies
FILES = ["model.keras", *(fmt.filename for fmt in registry.FORMATS)]


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
    fmt = {f.filename: f for f in registry.FORMATS}[name]
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
    assert classifier.names == DIGIT_NAMES and classifier.facts.preprocessing.input_size == 32
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
    named = [line.split(": ") for line in err.splitlines() if line.startswith("warning: ")]
    assert sorted(words[1] for words in named) == [
        str(folder / "broken.png"),
        str(folder / "truncated.png"),
    ]
    assert all(words[2] == "cannot read image" for words in named), named
    assert err.splitlines()[-1] == "error: 2 of 203 images could not be classified (named above)"


@pytest.mark.parametrize(
    "model,image,words",
    [
        ("absent.onnx", "000.png", "model not found"),
        ("exported", "000.png", "holds no model.keras; name one of its model files"),
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


def _screen(text: str) -> list:
    """The lines a terminal shows for `text`: a carriage return goes back to the start of
    the line, what follows overwrites it; escape sequences (cursor moves) are dropped."""
    lines, line, column = [], [], 0
    for character in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text):
        if character == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif character == "\r":
            column = 0
        else:
            line[column : column + 1] = [character]
            column += 1
    return lines + ["".join(line).rstrip()]


def test_on_a_terminal_the_bar_never_lands_in_front_of_a_result(exported, held_out):
    """stdout and stderr on one terminal (a pty), the bar drawn while results print: each
    result line shows the result alone, never behind the bar's text."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.predict",
        "--model",
        str(exported / "model.onnx"),
    ]
    command += [held_out[0], "--top-k", "1", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=REPO)
    with subprocess.Popen(command, stdout=follower, stderr=follower, env=env) as process:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # EIO: the last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=300)
    os.close(leader)
    raw = b"".join(chunks).decode()
    shown = [line for line in _screen(raw) if held_out[0] in line]
    assert process.returncode == 0 and len(shown) == HELD_OUT, raw[-2000:]
    assert raw.count("%|") >= 5  # the bar was drawn, again and again, between the results
    behind = [line for line in shown if not line.startswith(held_out[0])]
    assert behind == [], behind[:3]


# What a process that opened a file and ran it has imported (it prints the list): the
# runtime install (setup.cfg's `runtime` extra) has neither TensorFlow, Keras nor onnx.
IMPORTED = """
import sys
import numpy as np
from convmixer_tf.predict import Classifier

classifier = Classifier(sys.argv[1])
size = classifier.facts.preprocessing.input_size
scores = classifier.probabilities(np.full((1, size, size, 3), 128.0, np.float32))
assert scores.shape == (1, 10) and abs(float(scores.sum()) - 1) < 1e-2, scores
print(sorted(name for name in ("tensorflow", "keras", "onnx") if name in sys.modules))
"""


@pytest.mark.parametrize(
    "name, tensorflow",
    [
        ("model.onnx", False),
        ("model_int8.onnx", False),
        ("model.tflite", False),
        ("model_int8.tflite", False),
        ("saved_model", True),
    ],
)
def test_onnx_and_tflite_files_open_and_run_without_tensorflow(exported, name, tensorflow):
    """Opened, checked and run: an .onnx or .tflite file needs onnxruntime or LiteRT, never
    TensorFlow, Keras or the onnx package; a SavedModel needs TensorFlow, as it must."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTED, str(exported / name)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = done.stdout.strip().splitlines()[-1]
    assert ("'tensorflow'" in imported) == tensorflow and (tensorflow or imported == "[]"), imported


@pytest.mark.parametrize("name", ["model_int8.onnx", "model_int8.tflite"])
def test_predict_with_onnx_or_tflite_imports_no_tensorflow(exported, held_out, name):
    script = (
        "import sys; from convmixer_tf.predict.__main__ import main; "
        "code = main(sys.argv[1:]); "
        "print(sorted(n for n in ('tensorflow', 'keras') if n in sys.modules)); sys.exit(code)"
    )
    image = os.path.join(held_out[0], "000.png")
    done = subprocess.run(
        [sys.executable, "-c", script, "--model", str(exported / name), image, "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_large_inputs_are_loaded_a_few_at_a_time():
    """At 4096 px (201 MB an image, float32) a few images are loaded ahead of the model and
    classified together, not two batches of 32 (13 GB); at 224 px, the batches asked for."""
    import threading
    import types

    from convmixer_tf.config import Preprocessing
    from convmixer_tf.predict import Classifier

    class Counting(Classifier):
        def __init__(self, size):  # no file: what classify reads of a classifier
            self.facts = types.SimpleNamespace(preprocessing=Preprocessing(input_size=size))
            self.names = ("a", "b")
            self.loaded, self.most, self.batches = 0, 0, []
            self.lock = threading.Lock()

        def load(self, path):
            with self.lock:
                self.loaded += 1
                self.most = max(self.most, self.loaded)
            return np.zeros(2, np.float32)

        def probabilities(self, images):
            with self.lock:
                self.loaded -= len(images)
                self.batches.append(len(images))
            return np.full((len(images), 2), 0.5, np.float32)

    for size, batch, most in [(4096, 2, 4), (224, 32, 96)]:
        counting = Counting(size)
        results = list(classify(counting, [f"{i}.png" for i in range(100)]))
        assert len(results) == 100 and not any(r.error for r in results)
        assert max(counting.batches) == batch and counting.most <= most, (size, counting.most)
