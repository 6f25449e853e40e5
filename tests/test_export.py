import json
import os
import sys

import numpy as np
import pytest
from conftest import randomize_batchnorm, run_with_stdio

import convmixer_tf
from convmixer_tf import export as exporters
from convmixer_tf.config import IMAGENET_MEAN, IMAGENET_STD
from convmixer_tf.export.__main__ import main

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    # k=7 > 5 so the TFLite graph takes the tiled depthwise path.
    model = convmixer_tf.ConvMixer(
        dim=16, depth=2, kernel_size=7, patch_size=2, num_classes=10, input_shape=(SIZE, SIZE, 3)
    )
    return randomize_batchnorm(model)


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 3)).astype("float32")


def test_saved_model_signature_dynamic_batch(tmp_path, tiny, inputs):
    import tensorflow as tf

    path = exporters.export_saved_model(tiny, tmp_path / "sm")
    fn = tf.saved_model.load(path).signatures["serving_default"]
    assert list(fn.structured_input_signature[1]) == ["images"]
    assert fn.structured_input_signature[1]["images"].shape.as_list() == [None, SIZE, SIZE, 3]
    for batch in (1, 3):
        out = fn(images=tf.constant(inputs[:batch]))
        assert list(out) == ["logits"]
        np.testing.assert_allclose(
            out["logits"].numpy(), tiny.predict(inputs[:batch], verbose=0), atol=1e-5
        )
    row = exporters.verify(path, tiny, inputs, tolerance=1e-4)
    assert row["passed"] and row["top1_agreement"] == 1.0
    # Every weight stored once (keras' ExportArchive stores each twice).
    stored = tf.train.load_checkpoint(
        os.path.join(path, "variables", "variables")
    ).get_variable_to_shape_map()
    values = sum(int(np.prod(shape)) for key, shape in stored.items() if key.startswith("weights/"))
    assert values == tiny.count_params()


def _relu_model(kernel_size=9, negative_gamma=False, depthwise=True):
    model = randomize_batchnorm(
        convmixer_tf.ConvMixer(
            dim=16,
            depth=2,
            kernel_size=kernel_size,
            patch_size=2,
            num_classes=10,
            input_shape=(SIZE, SIZE, 3),
            activation="relu",
            depthwise=depthwise,
        )
    )
    if negative_gamma:  # BatchNorm scales < 0 cannot move into the conv: the other code path
        for name in ("stem_bn", "block0_dw_bn", "block1_pw_bn"):
            gamma, beta, mean, var = model.get_layer(name).get_weights()
            gamma[::3] *= -1
            model.get_layer(name).set_weights([gamma, beta, mean, var])
    return model


@pytest.mark.parametrize(
    "case", ["gelu", "relu", "relu_negative_gamma", "relu_k5", "relu_full_conv"]
)
def test_tflite_float32_builtin_ops_within_1e4(tmp_path, tiny, inputs, case):
    model = {
        "gelu": lambda: tiny,
        "relu": lambda: _relu_model(),
        "relu_k5": lambda: _relu_model(5),
        "relu_negative_gamma": lambda: _relu_model(negative_gamma=True),
        "relu_full_conv": lambda: _relu_model(7, depthwise=False),
    }[case]()
    path = exporters.export_tflite(model, tmp_path / "m.tflite")
    ops = exporters.op_names(path)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    assert ("DEPTHWISE_CONV_2D" in ops) == (case != "relu_full_conv")
    row = exporters.verify(path, model, inputs, tolerance=1e-4)
    assert row["passed"], row
    assert row["max_abs"] <= 1e-4
    for nchw in (False, True):  # the same graph rewrites feed the ONNX file
        row = exporters.verify(
            exporters.export_onnx(model, tmp_path / f"m{nchw}.onnx", nchw=nchw),
            model,
            inputs,
            tolerance=1e-4,
        )
        assert row["passed"], row


@pytest.mark.parametrize("k", [6, 7, 8, 9, 11, 13])
@pytest.mark.parametrize("taps", [9, 25])
def test_tile_plan_covers_the_kernel_once_with_small_tiles(k, taps):
    from convmixer_tf.export.graph import tile_plan

    plan = tile_plan(k, taps)
    cover = np.zeros((k, k), int)
    for r, c, h, w in plan:
        assert h * w <= taps and r + h <= k and c + w <= k, (r, c, h, w)
        cover[r : r + h, c : c + w] += 1
    assert (cover == 1).all()  # every tap exactly once: no zero-padded taps
    assert len(plan) == {(7, 9): 6, (9, 9): 9, (7, 25): 3, (9, 25): 4}.get((k, taps), len(plan))


def test_tiled_depthwise_equals_native_for_even_and_odd_kernels():
    import tensorflow as tf

    from convmixer_tf.export.graph import _kernel_tiles, _pad_same, _tiled_depthwise, tile_plan

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 13, 11, 6)).astype("float32")
    for k in (6, 7, 8, 9, 11):
        kernel = rng.normal(size=(k, k, 6, 1)).astype("float32")
        bias = rng.normal(size=6).astype("float32")
        ref = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME").numpy() + bias
        xp = _pad_same(tf.constant(x), k)
        for taps in (9, 25):
            plan = tile_plan(k, taps)
            got = _tiled_depthwise(xp, _kernel_tiles(kernel, plan), plan, 0, bias).numpy()
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"k={k} taps={taps}")
            # channels 2..3 alone, as one channel group of the graph
            part = _tiled_depthwise(
                xp, _kernel_tiles(kernel[:, :, 2:4], plan), plan, 2, bias[2:4]
            ).numpy()
            np.testing.assert_allclose(
                part, ref[..., 2:4], atol=1e-5, err_msg=f"k={k} taps={taps} group"
            )


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_inference_graph_channel_groups_equal_keras(activation):
    from convmixer_tf.export.graph import InferenceGraph

    model = randomize_batchnorm(
        convmixer_tf.ConvMixer(
            dim=16,
            depth=2,
            kernel_size=7,
            patch_size=2,
            num_classes=10,
            activation=activation,
            input_shape=(SIZE, SIZE, 3),
        ),
        seed=4,
    )
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    for groups in (1, 2, 4):
        got = InferenceGraph(model, depthwise="tiled", channel_groups=groups)(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"groups={groups}")
    with pytest.raises(ValueError, match="channel_groups"):
        InferenceGraph(model, depthwise="tiled", channel_groups=3)


@pytest.mark.parametrize(
    "activation,negative_gamma", [("gelu", False), ("relu", True), ("relu", False)]
)
def test_inference_graph_affine_forms_equal_keras(activation, negative_gamma):
    # "conv" writes what is left of each BatchNorm as a 1x1 depthwise conv (ONNX), "ops" as Mul/Add.
    from convmixer_tf.export.graph import InferenceGraph

    model = convmixer_tf.ConvMixer(
        dim=16,
        depth=2,
        kernel_size=5,
        patch_size=2,
        num_classes=10,
        activation=activation,
        input_shape=(32, 32, 3),
    )
    randomize_batchnorm(model, seed=3)
    if negative_gamma:  # scales that cannot move into a ReLU conv stay in the graph
        bn = model.get_layer("block0_pw_bn")
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([-gamma, beta, mean, var])
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    for form in ("ops", "conv"):
        got = InferenceGraph(model, affine=form)(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=form)


def test_tflite_float16_and_dynamic(tmp_path, tiny, inputs):
    for q, tol in (("float16", 1e-2), ("dynamic", None)):
        path = exporters.export_tflite(tiny, tmp_path / f"{q}.tflite", quantization=q)
        row = exporters.verify(path, tiny, inputs, tolerance=tol)
        assert row["passed"] and row["top1_agreement"] >= 0.75, row


def test_tflite_int8_full_integer_raw_rgb(tmp_path, tiny):
    from ai_edge_litert.interpreter import Interpreter

    from convmixer_tf.export.calibration import synthetic_images

    app = convmixer_tf.rebuild(tiny, preprocessing=(IMAGENET_MEAN, IMAGENET_STD))
    images = synthetic_images(40, SIZE, seed=3)
    calib, held_out = images[:32], images[32:]
    path = exporters.export_tflite(
        app,
        tmp_path / "int8.tflite",
        quantization="int8",
        representative_data=lambda: (im[None] for im in calib),
    )
    interp = Interpreter(model_path=str(path))
    assert interp.get_input_details()[0]["dtype"] == np.uint8
    # an app's raw bytes, as they are
    assert interp.get_input_details()[0]["quantization"] == (
        1.0,
        0,
    )
    assert interp.get_output_details()[0]["dtype"] == np.uint8  # MediaPipe refuses int8 outputs
    ops = exporters.op_names(path)
    assert not [op for op in ops if op.startswith("Flex")]
    row = exporters.verify(path, app, held_out)
    assert row["passed"] and np.isfinite(row["max_abs"])
    assert row["max_rel"] < 0.5, row  # quantised, but still the same function
    # Weights and activations are int8: no float32 tensor of weight size is left.
    big = [t for t in interp.get_tensor_details() if np.prod(t["shape"]) >= 16 * 16]
    assert big and all(t["dtype"] in (np.int8, np.uint8, np.int32) for t in big), sorted(
        {(t["name"], str(t["dtype"])) for t in big if t["dtype"] == np.float32}
    )[:3]


@pytest.mark.parametrize("nchw", [False, True])
def test_onnx_exact_gelu_loads_in_onnxruntime(tmp_path, tiny, inputs, nchw):
    import onnxruntime as ort

    path = exporters.export_onnx(tiny, tmp_path / "m.onnx", nchw=nchw)
    session = ort.InferenceSession(str(path))
    shape = session.get_inputs()[0].shape
    assert shape[1:] == ([3, SIZE, SIZE] if nchw else [SIZE, SIZE, 3])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    row = exporters.verify(path, tiny, inputs, tolerance=1e-4)
    assert row["passed"] and row["max_abs"] <= 1e-4, row


def test_onnx_gelu_is_fused_by_onnxruntime(tmp_path, tiny):
    # Each exact GELU must reach onnxruntime in the form its GeluFusion matches (one
    # kernel instead of five elementwise ops that each leave the NCHWc layout).
    import onnx
    import onnxruntime as ort

    path = exporters.export_onnx(tiny, tmp_path / "m.onnx", nchw=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("Gelu") == 1 + 2 * 2 and "Erf" not in ops, sorted(set(ops))


def test_broken_onnx_export_fails_loudly_and_writes_nothing(tmp_path, tiny, monkeypatch):
    from convmixer_tf.export import onnx as onnx_export

    # TF's exact gelu -> Erfc, unconvertible
    monkeypatch.setattr(onnx_export, "GELU_FORM", "builtin")
    with pytest.raises(exporters.ExportError, match="Erfc"):
        exporters.export_onnx(tiny, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_broken_tflite_export_fails_loudly_and_writes_nothing(tmp_path, tiny, monkeypatch):
    import tensorflow as tf

    from convmixer_tf.export import graph

    # An op with no TFLite builtin: with builtins only, conversion must fail, not go Flex.
    monkeypatch.setattr(
        graph.InferenceGraph, "_act", lambda self, x: tf.math.digamma(tf.abs(x) + 1.0)
    )
    with pytest.raises(exporters.ExportError, match="TFLite conversion failed"):
        exporters.export_tflite(tiny, tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_cli_all_formats(tmp_path, tiny, capsys):
    dynamic = convmixer_tf.rebuild(tiny, input_shape=(None, None, 3))
    dynamic.save(tmp_path / "tiny.keras")
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(tmp_path / "tiny.keras"),
            "--formats",
            "all",
            "--image-size",
            str(SIZE),
            "--output",
            str(out),
            "--processes",
            "1",
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in rows] == [f.name for f in exporters.registry.FORMATS]
    assert all(r["passed"] for r in rows)
    assert sorted(os.listdir(out)) == sorted(
        [f.filename for f in exporters.registry.FORMATS] + ["export_report.json", "RECORD"]
    )
    for r in rows:
        assert r["input"] == "raw RGB 0-255" and r["latency_ms"] > 0
        if r["format"] in ("saved_model", "tflite", "onnx"):
            assert r["max_abs"] <= 1e-4
        if r["format"].startswith("tflite"):
            assert not [op for op in r["ops"] if op.startswith("Flex")]


def test_cli_bad_input(tmp_path, tiny, capsys):
    import keras

    tiny.save(tmp_path / "tiny.keras")
    cases = [
        (["--model", str(tmp_path / "absent.keras")], "model not found"),
        (
            ["--model", str(tmp_path / "tiny.keras"), "--formats", "coreml"],
            "unknown export format 'coreml'",
        ),
    ]
    (tmp_path / "exists").mkdir()
    cases.append(
        (["--model", str(tmp_path / "tiny.keras"), "--output", str(tmp_path / "exists")], "exists")
    )
    cases.append(
        (["--model", str(tmp_path / "tiny.keras"), "--opset", "99"], "opset must be between 13")
    )
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        convmixer_tf.ConvMixer(
            dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(16, 16, 3)
        ).save(tmp_path / "bf16.keras")
    finally:
        keras.config.set_dtype_policy("float32")
    cases.append((["--model", str(tmp_path / "bf16.keras")], "export needs a float32 model"))
    for argv, words in cases:
        before = sorted(os.listdir(tmp_path))
        assert main(argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert sorted(os.listdir(tmp_path)) == before


def test_options_are_checked_where_they_enter():
    """A value no file could be written with is refused when the options are made, before
    the model is loaded or converted (the converter's parity takes minutes)."""
    from convmixer_tf.errors import BadInput

    for opset in (12, 19, 0):
        with pytest.raises(BadInput, match=f"opset must be between 13 and 18.*got {opset}"):
            exporters.ExportOptions(formats=("onnx",), opset=opset)
    assert exporters.ExportOptions(opset=13).opset == 13


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convmixer_768_32", "convmixer_1536_20"])
def test_full_size_float_exports(tmp_path, name):
    model = randomize_batchnorm(convmixer_tf.create_model(name), seed=2)
    options = exporters.ExportOptions(
        formats=("saved_model", "tflite", "onnx"), verify_count=2, latency_runs=1
    )
    rows = exporters.export_formats(model, tmp_path, options)
    for row in rows:
        assert row["passed"] and row["max_abs"] <= 1e-4, row
        assert row["top1_agreement"] == 1.0


def test_tflite_int8_of_a_trained_model_agrees_with_float_on_held_out_images(
    tmp_path, trained, digits
):
    # Random weights give nearly tied logits, where any rounding flips the top-1; a trained
    # model has real margins, so >= 97% agreement on images it never saw is a fair bar.
    model, calib = trained["model"], digits["calibration"]
    test_x = digits["held_out"][0]
    path = exporters.export_tflite(
        model,
        tmp_path / "int8.tflite",
        quantization="int8",
        representative_data=lambda: (im[None] for im in calib),
    )
    assert "DEPTHWISE_CONV_2D" in exporters.op_names(path)
    row = exporters.verify(path, model, test_x)
    assert row["top1_agreement"] >= 0.97, row
    # The table's cell: the agreement itself, or where uint8 scores tie, starred.
    if row["top1_tied"]:
        expected = f"{row['top1_among_best']:.1%}*"
    else:
        expected = f"{row['top1_agreement']:.1%}"
    assert exporters.top1_text(row, short=True) == expected


def _outputs(path, images):
    # the runner verification uses (uint8 outputs dequantised)
    return exporters.Runner(path)(images)


@pytest.mark.slow
def test_one_run_writes_the_tflite_files_separate_conversions_would(tmp_path, tiny):
    """The files of one run (one trace per layout, float16 derived from the float32 file,
    int8 in a process of its own) against each converted on its own, and the float16 file
    against the converter's own float16 quantisation: the same ops, the same outputs."""
    import tensorflow as tf

    from convmixer_tf.export import tflite
    from convmixer_tf.export.calibration import synthetic_images

    app = convmixer_tf.rebuild(tiny, preprocessing=(IMAGENET_MEAN, IMAGENET_STD))
    # what the run calibrates on (8) and checks with (4)
    images = synthetic_images(12, SIZE, seed=0)
    calib, held_out = images[:8], images[8:]
    quantizations = {
        "tflite": None,
        "tflite_float16": "float16",
        "tflite_dynamic": "dynamic",
        "tflite_int8": "int8",
    }
    (tmp_path / "run").mkdir()
    options = exporters.ExportOptions(
        formats=tuple(quantizations), calibration_count=8, verify_count=4, processes=2
    )
    exporters.export_formats(app, tmp_path / "run", options)
    for name, quantization in quantizations.items():
        fmt = exporters.registry.get(name)
        alone = exporters.export_tflite(
            app,
            tmp_path / fmt.filename,
            quantization=quantization,
            representative_data=lambda: (im[None] for im in calib),
        )
        shared = tmp_path / "run" / fmt.filename
        assert exporters.op_names(shared) == exporters.op_names(alone), name
        np.testing.assert_allclose(
            _outputs(shared, held_out), _outputs(alone, held_out), atol=1e-6, err_msg=name
        )
    traced = tflite.trace(app, tflite._tiling(convmixer_tf.facts_of(app).config.dim, "float16"))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([traced.function], traced.module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    # "fp16 inference is fine"
    converter.target_spec._experimental_supported_accumulation_type = tf.float16
    own, ours = tmp_path / "own.tflite", tmp_path / "ours.tflite"
    own.write_bytes(converter.convert())
    ours.write_bytes(tflite.float16_weights(tflite.convert(traced)))
    assert exporters.op_names(ours) == exporters.op_names(own)
    np.testing.assert_allclose(_outputs(ours, held_out), _outputs(own, held_out), atol=1e-6)
    assert (
        _metadata(ours)["reduced_precision_support"]
        == _metadata(own)["reduced_precision_support"]
        == b"fp16accfp16"
    )


def _metadata(path) -> dict:
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(path.read_bytes()))
    return {m.name.decode(): bytes(model.buffers[m.buffer].data) for m in model.metadata or []}


def test_quantised_rows_say_something_when_scores_tie():
    from convmixer_tf.export.scores import agreement

    reference = np.random.default_rng(0).normal(size=(4, 1000))
    tied = exporters.format_rows(
        [
            dict(
                format="tflite_int8",
                path="model_int8.tflite",
                bytes=1,
                output="probabilities",
                max_abs=1e-3,
                latency_ms=1.0,
                **agreement(np.zeros((4, 1000)), reference),
            )
        ]
    )
    assert (
        "0.0%" not in tied and "all 1000 scores round to the same uint8 value on this model" in tied
    )
    some = np.zeros((4, 1000))
    some[np.arange(4), reference.argmax(1)] = 1 / 256
    some[:2, 0] = 1 / 256  # two images where Keras' class shares the top with another
    row = agreement(some, reference)
    assert row["top1_tied"] == 0.5 and row["top1_all_tied"] == 0.0 and row["top1_among_best"] == 1.0
    assert "100.0% among its best (50% tied)" in exporters.top1_text(row)
    assert row[
        "top1_best_classes"
    ] == 2 and "on 50% of the images (a median of 2 of 1000)" in exporters.tie_note(row)


@pytest.mark.slow  # three exports in fresh interpreters: about 30 s here
@pytest.mark.parametrize(
    "stdout, stderr, code",
    [("closed", "pipe", 141), ("pipe", "closed", 0), ("full", "pipe", 2)],
    ids=["stdout closed", "stderr closed", "stdout full"],
)
def test_the_export_s_table_meets_a_closed_or_full_stdout(tmp_path, tiny, stdout, stderr, code):
    """The table of files is the export's result on stdout: closed, the export ends where it
    prints it, quietly (141; it was exit 3); full, one error line, exit 2 (it was 120); a
    closed stderr is silence, stdout holds the table alone and the exit code is 0 (it was
    1). The output folder is complete and in place each time: the table comes after."""
    tiny.save(tmp_path / "tiny.keras")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "convmixer_tf.export", "--model", str(tmp_path / "tiny.keras")]
    command += ["--formats", "onnx", "--processes", "1", "--output", str(out)]
    got, text, err = run_with_stdio(command, stdout=stdout, stderr=stderr)
    assert got == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert sorted(os.listdir(out)) == ["RECORD", "export_report.json", "model.onnx"]
    if stdout == "full":
        assert err.splitlines()[-1] == (
            "error: cannot write the results to stdout: No space left on device"
        )
    if stderr == "closed":
        assert text.splitlines()[:2] == [f"wrote {out}", text.splitlines()[1]], text
        assert text.splitlines()[1].split()[:2] == ["format", "file"], text
