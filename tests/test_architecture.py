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



# ------------------------------------------------------------------ each fact in one place

LIBRARY = [os.path.join(folder, name) for package in ("convmixer_tf", "weights_converter")
           for folder, _, names in os.walk(os.path.join(REPO, package)) for name in names if name.endswith(".py")]


def _functions(tree):
    import ast

    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _code_lines(source_lines, node):
    """Lines of a function's body that hold code (its docstring, comments and blanks aside)."""
    import ast

    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    text = source_lines[body[0].lineno - 1:node.end_lineno]
    return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))


def test_the_library_stays_small_and_plain():
    import ast

    problems = []
    for path in LIBRARY:
        source = open(path).read()
        lines = source.splitlines()
        name = os.path.relpath(path, REPO)
        if len(lines) > 400:
            problems.append(f"{name}: {len(lines)} lines")
        tree = ast.parse(source)
        for node in _functions(tree):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(positional) > 5:
                problems.append(f"{name}: {node.name} takes {len(positional)} positional arguments")
            if _code_lines(lines, node) > 40:
                problems.append(f"{name}: {node.name} has {_code_lines(lines, node)} lines of code")
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            problems.append(f"{name}: a module-level __getattr__")
        if "importlib" in source:
            problems.append(f"{name}: importlib")
        command_line = name.endswith(("__main__.py", "cli.py"))
        if not command_line and re.search(r"^\s*from convmixer_tf(\.cli import| import .*\bcli\b)", source, re.M):
            problems.append(f"{name}: library code imports command-line code")
    assert not problems, problems


def test_pixel_scale_arithmetic_lives_in_one_module():
    hits = []
    for path in LIBRARY:
        for number, line in enumerate(open(path), 1):
            code = re.sub(r"(\"[^\"]*\"|'[^']*'|#.*)", "", line)  # strings and comments aside
            if re.search(r"\b255\b", code):
                hits.append(f"{os.path.relpath(path, REPO)}:{number}")
    assert hits == ["convmixer_tf/config.py:" + str(next(
        i for i, line in enumerate(open(os.path.join(REPO, "convmixer_tf", "config.py")), 1)
        if line.startswith("PIXEL_MAX")))], hits


def test_formats_are_one_explicit_list_that_both_command_lines_offer():
    import ast

    from convmixer_tf.export.__main__ import build_parser as export_parser
    from weights_converter.__main__ import build_parser as converter_parser

    source = open(os.path.join(REPO, "convmixer_tf", "export", "registry.py")).read()
    listed = next(node.value for node in ast.parse(source).body if isinstance(node, ast.AnnAssign)
                  and getattr(node.target, "id", None) == "FORMATS")
    assert isinstance(listed, ast.List)  # a literal list: grep finds every format
    names = [f.name for f in registry.FORMATS]
    assert exporters.check_formats(["all"]) == names and len(listed.elts) <= len(names)
    for parser in (export_parser(), converter_parser()):
        shown = parser.format_help()
        assert all(re.search(rf"\b{name}\b", shown) for name in names), shown
    quantize = next(a for a in export_parser()._actions if a.dest == "quantize")
    assert set(quantize.choices) == {f.quantize for f in registry.FORMATS if f.quantize}


def test_the_normalisation_has_one_definition(tmp_path):
    """The model's layer, the eval transform, calibration, an exported graph, TFLite
    metadata and MediaPipe's pixels all give what Preprocessing.normalize gives."""
    import tensorflow as tf

    from convmixer_tf.config import Preprocessing
    from convmixer_tf.data import eval_transform
    from convmixer_tf.export import calibration, mobile, tflite
    from convmixer_tf.export.graph import InferenceGraph

    pre = Preprocessing(input_size=16, crop_pct=1.0, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    raw = np.round(calibration.synthetic_images(2, 16, seed=1))
    expected = pre.normalize(raw)
    model = convmixer_tf.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=3,
                                   input_shape=(16, 16, 3), include_preprocessing=True, mean=pre.mean, std=pre.std)
    layer = __import__("keras").Model(model.input, model.get_layer("preprocessing").output)
    np.testing.assert_allclose(layer(raw), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eval_transform(tf.constant(raw[0]), pre), expected[0], rtol=1e-5, atol=1e-5)
    normalised, _ = calibration.load_images(None, pre, 2, raw_rgb=False, seed=1)
    np.testing.assert_allclose(normalised, pre.normalize(calibration.synthetic_images(2, 16, seed=1)), atol=1e-5)
    graph = InferenceGraph(model)
    np.testing.assert_allclose(raw * graph.pre.scale + graph.pre.shift, expected, rtol=1e-5, atol=1e-5)
    info = convmixer_tf.info_of(model).replace(raw_rgb=False)
    meta = tflite.file_metadata(info, 16)
    np.testing.assert_allclose((raw - np.array(meta.mean)) / np.array(meta.std), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mobile.pixels(expected, info), raw.astype(np.uint8))


def test_a_checkpoint_flows_one_way(tmp_path):
    """Traced calls from --torch-ckpt to the written files: read (checkpoint, hub), map
    (mapping, convert), check (parity), save, export. Once a later step has begun, no
    earlier step's module is entered again. (The model's facts, its builder and the
    output rules are the library every step uses, not steps.)"""
    import sys

    from torch_helpers import save_checkpoint, timm_convmixer

    from weights_converter.__main__ import main

    # The list of formats (export.registry, of export.base's entries) is a table the command
    # consults while it checks its arguments and its output, before any work: not a step.
    stages = {"weights_converter.hub": 0, "weights_converter.checkpoint": 0, "weights_converter.mapping": 1,
              "weights_converter.convert": 1, "weights_converter.parity": 2,
              "convmixer_tf.contract.save_model": 3, "convmixer_tf.export": 4}
    ckpt = save_checkpoint(timm_convmixer(kernel_size=7).state_dict(), tmp_path / "m.pth")
    visits = []

    def profile(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            name = f"{module}.{frame.f_code.co_name}"
            stage = next((s for prefix, s in stages.items() if name == prefix or module.startswith(prefix)), None)
            stage = None if module in ("convmixer_tf.export.registry", "convmixer_tf.export.base") else stage
            if stage is not None and (not visits or visits[-1] != (stage, module)):
                visits.append((stage, module))

    sys.setprofile(profile)
    try:
        assert main(["--torch-ckpt", str(ckpt), "--export", "tflite", "onnx", "--quiet"]) == 0
    finally:
        sys.setprofile(None)
    order = [stage for stage, _ in visits]
    assert sorted(set(order)) == [0, 1, 2, 3, 4]
    backward = [(visits[i - 1], visits[i]) for i in range(1, len(visits)) if order[i] < order[i - 1]]
    assert backward == [], backward[:5]
