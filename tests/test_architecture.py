"""The shape of the package: one registry of export formats, one shared start-up that
keeps the command lines quiet, and the model's facts stored with it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import randomize_batchnorm

import convmixer_tf
from convmixer_tf import contract
from convmixer_tf import export as exporters
from convmixer_tf.export import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _KerasCopyRunner:
    output = "logits"

    def __init__(self, path, threads=2):
        import keras

        self.model = keras.models.load_model(path, compile=False)

    def __call__(self, images):
        return np.asarray(self.model.predict(images, verbose=0))


def _throwaway_format():
    """A format defined here and nowhere else: the export graph saved as another .keras file."""
    return registry.ExportFormat(
        name="keras_copy", filename="copy.keras", summary="the export graph as a .keras file (test only)",
        write=lambda job, path: job.model.save(path), load=_KerasCopyRunner, tolerance=1e-6,
        recognises=lambda path: str(path).endswith("copy.keras"))


def test_a_new_format_is_one_registration(tmp_path):
    from convmixer_tf.export.__main__ import build_parser as export_parser
    from weights_converter.__main__ import build_parser as converter_parser

    model = randomize_batchnorm(convmixer_tf.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=3,
                                                       input_shape=(16, 16, 3)))
    assert "keras_copy" not in registry.names()
    with registry.registered(_throwaway_format()):
        for parser in (export_parser(), converter_parser()):
            assert "keras_copy" in parser.format_help() and "copy.keras" in parser.format_help()
        assert "keras_copy" in exporters.check_formats(["all"])
        rows = exporters.export_formats(model, tmp_path, ["keras_copy"], verify_count=3, latency_runs=1)
        assert [r["format"] for r in rows] == ["keras_copy"] and rows[0]["passed"] and rows[0]["max_abs"] <= 1e-6
        assert os.listdir(tmp_path) == ["copy.keras"]
        x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
        reference = convmixer_tf.rebuild(model, preprocessing=(model.convmixer_info.preprocessing.mean,
                                                               model.convmixer_info.preprocessing.std))
        row = exporters.verify(tmp_path / "copy.keras", reference, x, tolerance=1e-6)  # recognised from the file
        assert row["format"] == "keras_copy" and row["passed"]
        with pytest.raises(ValueError, match="already registered"):
            registry.register(_throwaway_format())
    assert "keras_copy" not in registry.names() and "keras_copy" not in export_parser().format_help()


def test_the_documented_format_table_is_the_list_of_formats():
    page = open(os.path.join(REPO, "docs", "export.md")).read()
    assert registry.markdown_table() in page


# Lines TensorFlow, LiteRT, XNNPACK, absl, tf2onnx and Python's warnings write on their own.
FOREIGN = re.compile(r"^(WARNING: All log messages|[IWEF]\d{4} |INFO: |fully_quantize|To enable the following|"
                     r".*(oneDNN|XNNPACK|absl|tensorflow|Warning:|warnings\.warn))")
OURS = re.compile(r"^(reading|running|saving|exporting|  )")


def test_command_lines_print_only_their_own_lines(tmp_path):
    from torch_helpers import save_checkpoint, timm_convmixer

    path = save_checkpoint(timm_convmixer(kernel_size=7).state_dict(), tmp_path / "m.pth")
    env = dict(os.environ, PYTHONPATH=REPO)
    for key in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel", "ABSL_MIN_LOG_LEVEL"):
        env.pop(key, None)

    def run(*flags):
        out = tmp_path / f"out{len(flags)}{'v' if '--verbose' in flags else ''}"
        return subprocess.run([sys.executable, "-m", "weights_converter", "--torch-ckpt", str(path), "--output",
                               str(out), "--export", "tflite_int8", "onnx", "--calibration-count", "4", *flags],
                              capture_output=True, text=True, env=env, timeout=600)

    default = run()
    assert default.returncode == 0, default.stderr[-2000:]
    lines = default.stderr.splitlines()
    assert lines and all(OURS.match(line) for line in lines), [line for line in lines if not OURS.match(line)]
    quiet = run("--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    verbose = run("--verbose")  # what the default run keeps out
    assert verbose.returncode == 0 and any(FOREIGN.match(line) for line in verbose.stderr.splitlines())


def test_model_facts_travel_inside_the_keras_file(tmp_path):
    model = convmixer_tf.create_model("convmixer_256_8", input_shape=(32, 32, 3), include_preprocessing=True)
    names = tuple(f"class {i}" for i in range(10))
    info = contract.info_of(model).replace(class_names=names)
    assert info.preprocessing.crop_pct == 1.0 and info.variant == "convmixer_256_8"
    path = contract.save_model(model, tmp_path / "m.keras", info)
    loaded = contract.load_model(path)
    assert contract.info_of(loaded) == info
    # A headless model says so instead of pretending to have 1000 classes.
    features = convmixer_tf.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, include_top=False)
    assert convmixer_tf.config_from_model(features).num_classes == 0
    assert convmixer_tf.config_from_model(convmixer_tf.rebuild(features, input_shape=(8, 8, 3))).num_classes == 0
    with pytest.raises(ValueError, match="3 class names for a model with 10 classes"):
        info.replace(class_names=("a", "b", "c"))
    # Plain Keras, in a process that never imports us, still loads the file.
    script = ("import sys, keras; m = keras.models.load_model(sys.argv[1]); "
              "assert 'convmixer_tf' not in sys.modules; print(m.output_shape)")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0 and "(None, 10)" in proc.stdout, proc.stderr[-2000:]
    stored = json.loads(__import__("zipfile").ZipFile(path).read(contract.INFO_MEMBER))
    assert stored["class_names"] == list(names) and stored["config"]["dim"] == 256


def test_one_image_source_parser():
    from convmixer_tf.data import ImageSource, parse_source

    assert parse_source("images/") == ImageSource(folder="images/")
    assert parse_source("tfds:cifar10") == ImageSource(tfds_name="cifar10")
    assert parse_source("tfds:imagenette:validation[:50]") == ImageSource(tfds_name="imagenette",
                                                                          split="validation[:50]")
    with pytest.raises(ValueError, match=r"DIR\|tfds:NAME\[:SPLIT\]"):
        parse_source("tfds:")

