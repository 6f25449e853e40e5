"""TFLite files a phone app can ship as they are: metadata, class names, probabilities,
checked in the real client, MediaPipe Tasks' ImageClassifier (the C++ task graph that
Android, iOS and web apps run)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import DIGIT_NAMES, DIGIT_SIZE

import convmixer_tf
import weights_converter  # noqa: F401  (keeps triton out: timm loads it after TensorFlow)
from convmixer_tf import export as exporters
from convmixer_tf.export import metadata, mobile
from convmixer_tf.export.scores import softmax
from convmixer_tf.facts import facts_of

pytest.importorskip("mediapipe")

SIZE = DIGIT_SIZE
CLASSES = DIGIT_NAMES


@pytest.fixture(scope="module")
def setting(trained, digits, tmp_path_factory):
    """The session's trained model (its file), a folder of training digits as PNG files
    (calibration), and held-out digits with their labels."""
    import tensorflow as tf

    images = tmp_path_factory.mktemp("images")
    for i, image in enumerate(digits["train"][0][:72]):
        tf.io.write_file(str(images / f"{i:03d}.png"), tf.io.encode_png(image.astype(np.uint8)))
    test_x, test_y = digits["held_out"]
    return trained["path"], str(images), test_x[:64], test_y[:64]


def test_every_tflite_file_works_in_mediapipe_with_names_and_probabilities(tmp_path, setting):
    from convmixer_tf.export.__main__ import main

    path, images, test_x, test_y = setting
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                path,
                "--formats",
                "tflite",
                "tflite_float16",
                "tflite_int8",
                "--calibration-data",
                images,
                "--output",
                str(out),
                "--processes",
                "1",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    model = convmixer_tf.load_model(path)
    probs = softmax(model.predict(test_x, verbose=0))
    for name, tolerance in (
        ("model.tflite", 1e-4),
        ("model_float16.tflite", 1e-2),
        ("model_int8.tflite", None),
    ):
        file = out / name
        assert metadata.packed_labels(file) == list(CLASSES)
        scores, names = mobile.classify(file, test_x.astype(np.uint8), len(CLASSES))
        assert tuple(names) == CLASSES, name
        assert np.mean(scores.argmax(1) == test_y) >= 0.9, name  # the expected classes
        if tolerance is not None:
            assert np.abs(scores - probs).max() <= tolerance, name
        else:
            assert np.mean(scores.argmax(1) == probs.argmax(1)) >= 0.95, name
    rows = json.load(open(out / "export_report.json"))
    for row in rows:
        assert row["output"] == "probabilities" and row["labels"] == len(CLASSES)
        assert row["mediapipe"]["status"] == "ok" and "problem" not in row["mediapipe"], row
        assert row["gpu_delegate"] == "compatible"
    int8 = next(r for r in rows if r["format"] == "tflite_int8")
    assert int8["mediapipe"]["max_abs_vs_litert"] == 0.0
    # MediaPipe may round a quantised score one step away from LiteRT: that is allowed
    runner = exporters.Runner(out / "model_int8.tflite")
    step = runner.output_step
    assert 0 < step < 0.01
    check = SimpleNamespace(tolerance=None, runner=runner, facts=facts_of(model))
    for differs, allowed in ((step, True), (2 * step, False)):
        row = {"max_abs_vs_litert": differs}
        assert (mobile._problems(row, probs, CLASSES, check, probs) == []) == allowed, differs


def test_tflite_logits_flag_keeps_logits(tmp_path, setting):
    from convmixer_tf.export.__main__ import main

    path, _, test_x, _ = setting
    assert (
        main(
            [
                "--model",
                path,
                "--formats",
                "tflite",
                "onnx",
                "--tflite-logits",
                "--output",
                str(tmp_path / "o"),
                "--processes",
                "1",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    rows = json.load(open(tmp_path / "o" / "export_report.json"))
    assert [r["output"] for r in rows] == ["logits", "logits"]
    scores, _ = mobile.classify(
        tmp_path / "o" / "model.tflite", test_x.astype(np.uint8), len(CLASSES), logits=True
    )
    logits = convmixer_tf.load_model(path).predict(test_x, verbose=0)
    assert np.abs(scores - logits).max() <= 1e-4


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_gpu_delegate_takes_the_float_files(tmp_path, activation):
    model = convmixer_tf.ConvMixer(
        dim=32,
        depth=2,
        kernel_size=9,
        patch_size=7,
        num_classes=10,
        input_shape=(224, 224, 3),
        activation=activation,
        include_preprocessing=True,
    )
    path = exporters.export_tflite(model, tmp_path / "m.tflite")
    assert mobile.gpu_compatibility(path) == "compatible"


def test_wrong_or_unreadable_labels_exit_2_and_write_nothing(tmp_path, setting, capsys):
    from convmixer_tf.export.__main__ import main

    path = setting[0]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    cases = [
        (tmp_path / "three.txt", "3 class names for a model with 10 classes"),
        (tmp_path / "binary.txt", "cannot read labels file"),
        (tmp_path / "none.txt", "cannot read labels file"),
    ]
    for labels, words in cases:
        before = sorted(os.listdir(tmp_path))
        assert (
            main(
                [
                    "--model",
                    path,
                    "--formats",
                    "tflite",
                    "--labels",
                    str(labels),
                    "--output",
                    str(tmp_path / "out"),
                    "--quiet",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert sorted(os.listdir(tmp_path)) == before


def test_converter_labels_flag(tmp_path, capsys):
    from torch_helpers import save_checkpoint, timm_convmixer

    from weights_converter.__main__ import main

    ckpt = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")  # 10 classes
    (tmp_path / "nine.txt").write_text("".join(f"c{i}\n" for i in range(9)))
    assert main(["--torch-ckpt", str(ckpt), "--labels", str(tmp_path / "nine.txt"), "--quiet"]) == 2
    assert "9 class names for a model with 10 classes" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "nine.txt"]
    (tmp_path / "ten.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    assert (
        main(
            [
                "--torch-ckpt",
                str(ckpt),
                "--labels",
                str(tmp_path / "ten.txt"),
                "--export",
                "tflite",
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["conversion"]["class_names"] == "labels file"
    out = tmp_path / "m_keras"
    assert facts_of(convmixer_tf.load_model(out / "model.keras")).class_names[3] == "c3"
    assert metadata.packed_labels(out / "model.tflite")[9] == "c9"


# The smallest network at SIZE px, raw RGB in (what phone apps pass).
TINY_RAW = dict(
    dim=8,
    depth=1,
    kernel_size=3,
    patch_size=4,
    input_shape=(SIZE, SIZE, 3),
    include_preprocessing=True,
)


def test_files_without_metadata_still_verify(tmp_path):
    """A .tflite written before files carried metadata: LiteRT checks it, MediaPipe is skipped."""
    from convmixer_tf.export import tflite

    model = convmixer_tf.ConvMixer(num_classes=3, **TINY_RAW)
    traced = tflite.trace(model, (1, 9), output="logits")
    path = tmp_path / "old.tflite"
    path.write_bytes(tflite.convert(traced))
    assert metadata.read_metadata(path) is None
    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    row = exporters.verify(path, model, x, tolerance=1e-4)
    assert row["passed"] and row["output"] == "logits" and row["metadata"] is False
    assert row["mediapipe"]["status"].startswith("skipped: the file has no metadata")


@pytest.mark.parametrize("pooling", [None, "avg"])
def test_a_head_less_model_exports_to_tflite_and_mediapipe_is_not_asked(tmp_path, pooling):
    """MediaPipe's ImageClassifier takes a classifier: a model that gives features is
    exported and checked in LiteRT, and its row says why MediaPipe was skipped (pooling None
    ended the export with exit 3 in the MediaPipe check)."""
    from convmixer_tf.export.__main__ import main

    model = convmixer_tf.ConvMixer(include_top=False, pooling=pooling, **TINY_RAW)
    convmixer_tf.save_model(model, tmp_path / "features.keras")
    out = tmp_path / "out"
    command = ["--model", str(tmp_path / "features.keras"), "--formats", "tflite"]
    assert main([*command, "--output", str(out), "--quiet"]) == 0
    (row,) = json.load(open(out / "export_report.json"))
    assert row["passed"] and "gives features, not classes" in row["mediapipe"]["status"]


@pytest.mark.slow
def test_released_variant_gets_imagenet_names_in_mediapipe(tmp_path):
    import timm
    from torch_helpers import save_checkpoint

    from weights_converter.__main__ import main
    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(
        timm.create_model("convmixer_1024_20_ks9_p14", pretrained=False), seed=1
    ).eval()
    ckpt = save_checkpoint(net.state_dict(), tmp_path / "c.pth")
    assert main(["--torch-ckpt", str(ckpt), "--export", "tflite", "--quiet"]) == 0
    out = tmp_path / "c_keras"
    first = timm.data.ImageNetInfo().label_descriptions()[0].split(",")[0]
    assert facts_of(convmixer_tf.load_model(out / "model.keras")).class_names[0] == first == "tench"
    image = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    scores, names = mobile.classify(out / "model.tflite", image, 1000)
    assert names[0] == "tench" and len(set(names)) > 990 and abs(float(scores.sum()) - 1.0) < 1e-3
