"""int8 ONNX for CPU servers: onnxruntime's static quantisation, checked in onnxruntime and
in a second runtime (OpenVINO) on images held out from calibration."""

import json
import os
import shutil

import numpy as np
import pytest

from convmixer_tf import export as exporters
from convmixer_tf.export.onnx import OnnxRunner
from convmixer_tf.export.onnx_int8 import export_onnx_int8


@pytest.fixture(scope="module")
def setting(trained, digits):
    """The session's trained model, its held-out digits, Keras' logits on them, calibration images."""
    return trained["model"], digits["held_out"][0], trained["logits"], digits["calibration"]


def openvino_outputs(path, images):
    import openvino as ov

    # f32: on CPUs with AVX512_BF16 OpenVINO would otherwise compute the float parts in bfloat16.
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.concatenate([compiled(image[None])[compiled.output(0)] for image in images])


def agreement(a, b):
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def test_int8_onnx_agrees_with_float_in_onnxruntime_and_openvino(tmp_path, setting):
    model, held_out, logits, calibration = setting
    path = export_onnx_int8(model, tmp_path / "model_int8.onnx", calibration)
    ort_int8 = OnnxRunner(path)(held_out)
    assert agreement(ort_int8, logits) >= 0.97, agreement(ort_int8, logits)
    ov_int8 = openvino_outputs(path, held_out)
    assert agreement(ov_int8, logits) >= 0.97 and agreement(ov_int8, ort_int8) >= 0.97
    float_path = exporters.export_onnx(model, tmp_path / "model.onnx")
    assert (
        np.abs(
            openvino_outputs(float_path, held_out[:16]) - OnnxRunner(float_path)(held_out[:16])
        ).max()
        <= 1e-4
    )
    import onnx

    big = [t for t in onnx.load(path).graph.initializer if np.prod(t.dims) >= 32 * 32]
    assert big and all(t.data_type == onnx.TensorProto.INT8 for t in big)  # weights stored in int8


def test_a_wrong_calibration_breaks_the_agreement(tmp_path, setting):
    model, held_out, logits, calibration = setting
    path = export_onnx_int8(model, tmp_path / "wrong.onnx", calibration / 8)  # images 1/8 as bright
    assert agreement(OnnxRunner(path)(held_out), logits) < 0.97


def test_cli_without_calibration_data_uses_synthetic_images_and_says_so(tmp_path, trained, capsys):
    from convmixer_tf.export.__main__ import main

    shutil.copy(trained["path"], tmp_path / "m.keras")
    assert (
        main(
            [
                "--model",
                str(tmp_path / "m.keras"),
                "--formats",
                "onnx_int8",
                "--calibration-count",
                "16",
                "--output",
                str(tmp_path / "out"),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)[0]
    assert row["format"] == "onnx_int8" and row["path"] == "model_int8.onnx" and row["passed"]
    assert row["inputs"].startswith("synthetic") and "held out from calibration" in row["inputs"]
    assert "reduce_range" in row["quantisation"] and row["top1_agreement"] is not None
    assert sorted(os.listdir(tmp_path / "out")) == [
        "RECORD",
        "export_report.json",
        "model_int8.onnx",
    ]


def test_broken_quantisation_exits_2_and_writes_nothing(tmp_path, trained, capsys):
    from convmixer_tf.export.__main__ import main
    from weights_converter.__main__ import main as convert

    shutil.copy(trained["path"], tmp_path / "m.keras")
    before = sorted(os.listdir(tmp_path))
    for data in (tmp_path / "no_such_folder", tmp_path / "m.keras"):
        assert (
            main(
                [
                    "--model",
                    str(tmp_path / "m.keras"),
                    "--formats",
                    "onnx_int8",
                    "--calibration-data",
                    str(data),
                    "--output",
                    str(tmp_path / "out"),
                    "--quiet",
                ]
            )
            == 2
        )
        assert capsys.readouterr().err.startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(SystemExit):  # both command lines offer the format
        convert(["--help"])
    assert "onnx_int8" in capsys.readouterr().out
