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
from convmixer_tf import export as exporters
from convmixer_tf import saving
from convmixer_tf.export import keras_file, registry
from convmixer_tf.facts import FACTS_FILE, attach, facts_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_copy(job, path):
    """A throwaway format's writer: the export graph as another .keras file, facts inside
    (`saving.save_model` writes atomically)."""
    saving.save_model(job.model, path)


def where_checked(path, check):
    """What its row adds: the process that wrote and checked the file."""
    return {"pid": os.getpid()}


# A format defined here and nowhere else, as docs/architecture.md's recipe says: its
# callables are module-level (a worker process gets the format pickled).
COPY = registry.ExportFormat(
    name="keras_copy",
    filename="model_copy.keras",
    summary="the export graph as a .keras file (test only)",
    write=write_copy,
    load=keras_file.KerasRunner,
    tolerance=1e-6,
    describe=where_checked,
    facts=saving.stored_facts,
)


def test_a_new_format_follows_the_recipe(tmp_path, monkeypatch):
    """The recipe for adding a format, followed: FORMATS patched with one more, which both
    command lines list, the run writes and verifies in one process and with the default,
    and `verify` and `open_model` recognise by its file's name."""
    from convmixer_tf.export.__main__ import build_parser as export_parser
    from convmixer_tf.export.model_file import open_model
    from weights_converter.__main__ import build_parser as converter_parser

    model = randomize_batchnorm(
        convmixer_tf.ConvMixer(
            dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=3, input_shape=(16, 16, 3)
        )
    )
    assert "keras_copy" not in registry.names()
    monkeypatch.setattr(registry, "FORMATS", (*registry.FORMATS, COPY))
    for parser in (export_parser(), converter_parser()):
        assert "keras_copy" in parser.format_help() and "model_copy.keras" in parser.format_help()
    assert "keras_copy" in exporters.check_formats(["all"])
    for processes in (1, None):
        out = tmp_path / str(processes)
        out.mkdir()
        options = exporters.ExportOptions(
            formats=("keras_copy",), verify_count=3, latency_runs=1, processes=processes
        )
        (row,) = exporters.export_formats(model, out, options)
        assert row["format"] == "keras_copy" and row["passed"] and row["max_abs"] <= 1e-6
        assert row["pid"] == os.getpid() and os.listdir(out) == ["model_copy.keras"]
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    pre = convmixer_tf.facts_of(model).preprocessing
    reference = convmixer_tf.rebuild(model, preprocessing=(pre.mean, pre.std))
    # recognised from the file's name
    row = exporters.verify(out / "model_copy.keras", reference, x, tolerance=1e-6)
    assert row["format"] == "keras_copy" and row["passed"]
    opened = open_model(out / "model_copy.keras")
    assert opened.kind == "keras_copy" and opened.facts == convmixer_tf.facts_of(reference)


def test_the_documented_format_table_is_the_list_of_formats():
    page = open(os.path.join(REPO, "docs", "export.md")).read()
    assert registry.markdown_table() in page


# Lines TensorFlow, LiteRT, XNNPACK, absl, tf2onnx and Python's warnings write on their own.
FOREIGN = re.compile(
    r"^(WARNING: All log messages|[IWEF]\d{4} |INFO: |fully_quantize|To enable the following|"
    r".*(oneDNN|XNNPACK|absl|tensorflow|Warning:|warnings\.warn))"
)
OURS = re.compile(r"^(reading|running|saving|exporting|  )")


def _converter_printing(tmp_path, *flags):
    """The converter (the noisiest command: TensorFlow, LiteRT, absl, tf2onnx and the int8
    quantiser all print) run on a small checkpoint, its C++ logs not silenced beforehand."""
    from torch_helpers import save_checkpoint, timm_convmixer

    path = save_checkpoint(timm_convmixer(kernel_size=7).state_dict(), tmp_path / "m.pth")
    env = dict(os.environ, PYTHONPATH=REPO)
    for key in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel", "ABSL_MIN_LOG_LEVEL"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "weights_converter",
        "--torch-ckpt",
        str(path),
        "--output",
        str(tmp_path / "out"),
        "--export",
        "tflite_int8",
        "onnx",
        "--calibration-count",
        "4",
        *flags,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_command_lines_print_only_their_own_lines(tmp_path):
    default = _converter_printing(tmp_path)
    assert default.returncode == 0, default.stderr[-2000:]
    lines = default.stderr.splitlines()
    assert lines and all(OURS.match(line) for line in lines), [
        line for line in lines if not OURS.match(line)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--quiet", "--verbose"])
def test_quiet_prints_nothing_and_verbose_lets_the_libraries_speak(tmp_path, flag):
    done = _converter_printing(tmp_path, flag)
    assert done.returncode == 0, done.stderr[-2000:]
    if flag == "--quiet":
        assert done.stderr == "", done.stderr[-2000:]
    else:  # what the default run keeps out
        assert any(FOREIGN.match(line) for line in done.stderr.splitlines())


def test_model_facts_travel_inside_the_keras_file(tmp_path):
    model = convmixer_tf.create_model(
        "convmixer_256_8", input_shape=(32, 32, 3), include_preprocessing=True
    )
    names = tuple(f"class {i}" for i in range(10))
    facts = facts_of(model).replace(class_names=names)
    assert facts.preprocessing.crop_pct == 1.0 and facts.variant == "convmixer_256_8"
    path = saving.save_model(attach(model, facts), tmp_path / "m.keras")
    loaded = saving.load_model(path)
    assert facts_of(loaded) == facts
    # A headless model says so instead of pretending to have 1000 classes.
    features = convmixer_tf.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=2, include_top=False
    )
    assert convmixer_tf.facts_of(features).config.num_classes == 0
    rebuilt = convmixer_tf.rebuild(features, input_shape=(8, 8, 3))
    assert convmixer_tf.facts_of(rebuilt).config.num_classes == 0
    with pytest.raises(ValueError, match="3 class names for a model with 10 classes"):
        facts.replace(class_names=("a", "b", "c"))
    # Plain Keras, in a process that never imports us, still loads the file.
    script = (
        "import sys, keras; m = keras.models.load_model(sys.argv[1]); "
        "assert 'convmixer_tf' not in sys.modules; print(m.output_shape)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=""),
    )
    assert proc.returncode == 0 and "(None, 10)" in proc.stdout, proc.stderr[-2000:]
    stored = json.loads(__import__("zipfile").ZipFile(path).read(FACTS_FILE))
    assert stored["class_names"] == list(names) and stored["config"]["dim"] == 256


def test_one_image_source_parser():
    from convmixer_tf.images import ImageSource, parse_source

    assert parse_source("images/") == ImageSource(folder="images/")
    assert parse_source("tfds:cifar10") == ImageSource(tfds_name="cifar10")
    assert parse_source("tfds:imagenette:validation[:50]") == ImageSource(
        tfds_name="imagenette", split="validation[:50]"
    )
    with pytest.raises(ValueError, match=r"DIR\|tfds:NAME\[:SPLIT\]"):
        parse_source("tfds:")


# ------------------------------------------------------------------ each fact in one place

LIBRARY = [
    os.path.join(folder, name)
    for package in ("convmixer_tf", "weights_converter")
    for folder, _, names in os.walk(os.path.join(REPO, package))
    for name in names
    if name.endswith(".py")
]


def _functions(tree):
    import ast

    return [
        node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def _code_lines(source_lines, node):
    """Lines of a function's body that hold code (its docstring, comments and blanks aside)."""
    import ast

    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    text = source_lines[body[0].lineno - 1 : node.end_lineno]
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
            positional = [
                a.arg
                for a in node.args.posonlyargs + node.args.args
                if a.arg not in ("self", "cls")
            ]
            if len(positional) > 5:
                problems.append(f"{name}: {node.name} takes {len(positional)} positional arguments")
            if _code_lines(lines, node) > 40:
                problems.append(f"{name}: {node.name} has {_code_lines(lines, node)} lines of code")
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            problems.append(f"{name}: a module-level __getattr__")
        if "importlib" in source:
            problems.append(f"{name}: importlib")
    assert not problems, problems


def test_a_model_carries_its_facts_and_nothing_passes_them_beside_it():
    """Facts travel on one channel, the model (`facts.attach`, `facts_of`): no function of
    the library takes a model and its facts (or "info") side by side."""
    import ast

    beside = []
    for path in LIBRARY:
        for node in _functions(ast.parse(open(path).read())):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            names = {argument.arg for argument in arguments}
            alongside = "model" in names and names & {"facts", "info"}
            if alongside and node.name != "attach":  # attach puts them on the model
                beside.append(f"{os.path.relpath(path, REPO)}: {node.name}")
    assert not beside, beside


def test_pixel_scale_arithmetic_lives_in_one_module():
    hits = []
    for path in LIBRARY:
        for number, line in enumerate(open(path), 1):
            code = re.sub(r"(\"[^\"]*\"|'[^']*'|#.*)", "", line)  # strings and comments aside
            if re.search(r"\b255\b", code):
                hits.append(f"{os.path.relpath(path, REPO)}:{number}")
    assert hits == [
        "convmixer_tf/config.py:"
        + str(
            next(
                i
                for i, line in enumerate(open(os.path.join(REPO, "convmixer_tf", "config.py")), 1)
                if line.startswith("PIXEL_MAX")
            )
        )
    ], hits


def test_formats_are_one_explicit_tuple_that_both_command_lines_offer():
    import ast

    from convmixer_tf.export.__main__ import build_parser as export_parser
    from weights_converter.__main__ import build_parser as converter_parser

    source = open(os.path.join(REPO, "convmixer_tf", "export", "registry.py")).read()
    listed = next(
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FORMATS"
    )
    assert isinstance(listed, ast.Tuple)  # a literal tuple: grep finds every format
    names = [f.name for f in registry.FORMATS]
    assert exporters.check_formats(["all"]) == names and len(listed.elts) <= len(names)
    for parser in (export_parser(), converter_parser()):
        shown = parser.format_help()
        assert all(re.search(rf"\b{name}\b", shown) for name in names), shown
    quantize = next(a for a in export_parser()._actions if a.dest == "quantize")
    # each value adds its TFLite file
    assert {f"tflite_{value}" for value in quantize.choices} == {
        name for name in names if name.startswith("tflite_")
    }


# The export options both command lines offer, and how each reads them back.
SHARED_EXPORT_OPTIONS = (
    "--quantize",
    "--calibration-data",
    "--calibration-count",
    "--no-preprocessing",
    "--tflite-logits",
    "--nchw",
    "--opset",
    "--processes",
)


def test_both_command_lines_declare_the_export_options_once():
    """The converter offers the export options the export command does, with the same
    help, defaults and checks, and reads them into the same ExportOptions."""
    from convmixer_tf.export.__main__ import build_parser as export_parser
    from weights_converter.__main__ import build_parser as converter_parser
    from weights_converter.__main__ import options_from as converter_options

    def declared(parser):
        actions = {s: a for a in parser._actions for s in a.option_strings}
        return {
            flag: (
                actions[flag].help,
                actions[flag].default,
                actions[flag].choices,
                getattr(actions[flag].type, "__name__", None),
            )
            for flag in SHARED_EXPORT_OPTIONS
            if flag in actions
        }

    assert declared(export_parser()) == declared(converter_parser())
    assert sorted(declared(converter_parser())) == sorted(SHARED_EXPORT_OPTIONS)
    flags = ["--quantize", "int8", "--calibration-count", "7", "--no-preprocessing", "--nchw"]
    flags += ["--opset", "15", "--tflite-logits", "--processes", "1"]
    from convmixer_tf.export.__main__ import export_options_from

    exported = export_options_from(
        export_parser().parse_args(["--model", "m.keras", "--formats", "onnx", *flags])
    )
    converted = converter_options(
        converter_parser().parse_args(["--torch-ckpt", "m.pth", "--export", "onnx", *flags])
    ).export
    assert exported == converted
    assert exported.formats == ("onnx", "tflite_int8") and exported.nchw and not exported.raw_rgb


def test_the_tolerance_rule_is_written_once():
    """A float file, MediaPipe's scores and a parity stage are judged by one rule:
    `scores.allowed`, the tolerance times the largest reference output, at least 1."""
    from convmixer_tf.export.scores import allowed

    assert allowed(1e-4, np.array([[-3.0, 2.0]])) == pytest.approx(3e-4)
    assert allowed(1e-4, np.array([[0.5, -0.25]])) == 1e-4
    assert allowed(1e-4, np.zeros((0, 3))) == 1e-4
    hits = [
        f"{os.path.relpath(path, REPO)}:{number}"
        for path in LIBRARY
        for number, line in enumerate(open(path), 1)
        # a tolerance scaled by the outputs, or a difference scaled down by them
        if re.search(r"(tol\w* \* |/ \(?)max\(1(\.0)?, ", line.split("#")[0])
    ]
    assert [hit.split(":")[0] for hit in hits] == ["convmixer_tf/export/scores.py"], hits


def test_the_library_patches_nothing_and_calls_no_c_by_hand():
    """No unittest.mock in library code, and no ctypes (PR_SET_PDEATHSIG): the standard
    library's own ways instead."""
    hits = [
        f"{os.path.relpath(path, REPO)}:{number}"
        for path in LIBRARY
        for number, line in enumerate(open(path), 1)
        if re.search(r"unittest|PR_SET_PDEATHSIG|ctypes", line)
    ]
    assert hits == [], hits


def test_the_normalisation_has_one_definition(tmp_path):
    """The model's layer, the eval transform, calibration, an exported graph, TFLite
    metadata and MediaPipe's pixels all give what Preprocessing.normalize gives."""
    import tensorflow as tf

    from convmixer_tf.config import Preprocessing
    from convmixer_tf.export import calibration, metadata, mobile
    from convmixer_tf.export.graph import InferenceGraph
    from convmixer_tf.images import eval_transform

    pre = Preprocessing(input_size=16, crop_pct=1.0, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    raw = np.round(calibration.synthetic_images(2, 16, seed=1))
    expected = pre.normalize(raw)
    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(16, 16, 3),
        include_preprocessing=True,
        mean=pre.mean,
        std=pre.std,
    )
    layer = __import__("keras").Model(model.input, model.get_layer("preprocessing").output)
    np.testing.assert_allclose(layer(raw), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        eval_transform(tf.constant(raw[0]), pre), expected[0], rtol=1e-5, atol=1e-5
    )
    normalised, _ = calibration.load_images(None, pre, 2, raw_rgb=False, seed=1)
    np.testing.assert_allclose(
        normalised, pre.normalize(calibration.synthetic_images(2, 16, seed=1)), atol=1e-5
    )
    graph = InferenceGraph(model)
    np.testing.assert_allclose(
        raw * graph.pre.scale + graph.pre.shift, expected, rtol=1e-5, atol=1e-5
    )
    info = convmixer_tf.facts_of(model).replace(raw_rgb=False)
    mean, std = metadata.normalisation(info)
    np.testing.assert_allclose(
        (raw - np.array(mean)) / np.array(std), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(mobile.pixels(expected, info), raw.astype(np.uint8))


def _packed(tree) -> list:
    """(line, what) of each line that says more than one thing: a conditional expression or
    and/or used as a statement, a chained conditional, a loop over a conditional, more than
    two targets assigned from one tuple, a conditional inside a tuple assignment."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, (ast.IfExp, ast.BoolOp)):
            found.append((node.lineno, "a conditional or and/or used as a statement"))
        if isinstance(node, ast.IfExp) and isinstance(node.orelse, ast.IfExp):
            found.append((node.lineno, "a chained conditional expression"))
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.IfExp):
            found.append((node.lineno, "a loop over a conditional expression"))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Tuple) and len(target.elts) > 2:
                    found.append((node.lineno, f"{len(target.elts)} targets assigned at once"))
                if isinstance(target, ast.Tuple) and any(
                    isinstance(e, ast.IfExp) for e in node.value.elts
                ):
                    found.append((node.lineno, "a conditional inside a tuple assignment"))
    return found


def test_a_line_says_one_thing():
    import ast

    packed = [
        f"{os.path.relpath(path, REPO)}:{line}: {what}"
        for path in LIBRARY
        for line, what in _packed(ast.parse(open(path).read()))
    ]
    assert packed == [], packed


def test_the_check_finds_packed_lines():
    import ast

    source = (
        "a if b else c\nx and f()\nv = 1 if p else 2 if q else 3\nfor i in (s if t else ()): pass\n"
        "self.a, self.b, self.c = 1, 2, 3\n(p, q), (r, s) = f(p), g(q) if r else (None, 0)\n"
    )
    assert sorted(line for line, _ in _packed(ast.parse(source))) == [1, 2, 3, 4, 5, 6]


def test_an_internal_error_is_exit_3_with_its_traceback_and_bad_input_exit_2(
    tmp_path, monkeypatch, capsys
):
    """Only the user's input is exit 2: a ValueError from inside (a bug) is exit 3, with the
    traceback to report."""
    from convmixer_tf.errors import BadInput
    from convmixer_tf.export.__main__ import main

    verify = sys.modules["convmixer_tf.export.verify"]  # the package's face shows its function

    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(16, 16, 3),
        include_preprocessing=True,
    )
    path = convmixer_tf.save_model(model, tmp_path / "m.keras")
    argv = ["--model", str(path), "--formats", "onnx", "--processes", "1", "--quiet"]
    for error, code in (
        (ValueError("shapes (3,) and (4,) not aligned"), 3),
        (BadInput("a bad value"), 2),
    ):

        def broken(*args, error=error):
            raise error

        monkeypatch.setattr(verify, "compare", broken)
        assert main([*argv, "--output", str(tmp_path / f"out{code}")]) == code
        err = capsys.readouterr().err
        if code == 3:
            assert "internal error (a bug" in err and "Traceback" in err and "not aligned" in err
        else:
            assert err.strip() == "error: a bad value"
        assert not (tmp_path / f"out{code}").exists()
