"""Every value from outside is checked where it enters: a Hub repo's config.json (each
field: wrong types, non-finite and out-of-range values, hostile strings) and the command
lines' numbers. Bad ones are exit 2 with one line naming the file, the field and what is
allowed; nothing is written. Text that does get in reaches the model card only as YAML a
YAML library wrote, or as escaped Markdown."""

import copy
import json
import os
import re

import pytest
import yaml
from test_hub import hub_cache, safetensors_bytes
from test_safety import one_error_line
from torch_helpers import timm_convmixer

REPO_ID = "someone/convmixer"
CONFIG = {  # a valid timm config.json for the tiny network (10 classes)
    "architecture": "convmixer",
    "num_classes": 10,
    "label_names": [f"class {i}" for i in range(10)],
    "pretrained_cfg": {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "license": "mit",
    },
}
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def weights():
    return safetensors_bytes(timm_convmixer())


@pytest.fixture
def offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def convert(offline, weights, config_bytes, out, *more):
    from weights_converter.__main__ import main

    hub_cache(offline, REPO_ID, {"model.safetensors": weights, "config.json": config_bytes})
    return main(["--torch-ckpt", f"hf-hub:{REPO_ID}", "--output", str(out), "--quiet", *more])


def changed(path, value):
    """CONFIG with the field at `path` ("pretrained_cfg.mean") set to `value`."""
    config = copy.deepcopy(CONFIG)
    *parents, key = path.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[key] = value
    return config


BAD = [  # (field, value, words the one line must hold)
    ("pretrained_cfg", [1, 2], "pretrained_cfg must be an object"),
    ("label_names", list(range(10)), "label_names must be a list of strings"),
    ("label_names", [["a"]] * 10, "label_names must be a list of strings"),
    ("label_names", "class 0", "label_names must be a list"),
    (
        "label_names",
        ["a", "b", "c"],
        "label_names of config.json of hf-hub:someone/convmixer: 3 class names",
    ),
    ("label_names", ["a\nb"] + [f"c{i}" for i in range(9)], "control character U+000A"),
    ("pretrained_cfg.input_size", 224, "pretrained_cfg.input_size must be [3, SIZE, SIZE]"),
    (
        "pretrained_cfg.input_size",
        [3, 224, 192],
        "pretrained_cfg.input_size must be [3, SIZE, SIZE]",
    ),
    (
        "pretrained_cfg.input_size",
        [3, 0, 0],
        "pretrained_cfg.input_size must be an integer from 1 to 4096",
    ),
    (
        "pretrained_cfg.input_size",
        [3, 10**6, 10**6],
        "pretrained_cfg.input_size must be an integer from 1 to 4096",
    ),
    (
        "pretrained_cfg.input_size",
        [3, -5, -5],
        "pretrained_cfg.input_size must be an integer from 1 to 4096",
    ),
    ("pretrained_cfg.input_size", [3, "a", "a"], "pretrained_cfg.input_size must be an integer"),
    ("pretrained_cfg.mean", 1, "pretrained_cfg.mean must be 3 finite numbers"),
    ("pretrained_cfg.mean", ["abc", 1, 1], "pretrained_cfg.mean must be 3 finite numbers"),
    ("pretrained_cfg.mean", [NAN, 0.5, 0.5], "pretrained_cfg.mean must be 3 finite numbers"),
    ("pretrained_cfg.mean", [0.5, 0.5], "pretrained_cfg.mean must be 3 finite numbers"),
    ("pretrained_cfg.mean", [True, 0.5, 0.5], "pretrained_cfg.mean must be 3 finite numbers"),
    ("pretrained_cfg.std", [NAN, NAN, NAN], "pretrained_cfg.std must be 3 finite numbers > 0"),
    ("pretrained_cfg.std", [INF, 1, 1], "pretrained_cfg.std must be 3 finite numbers > 0"),
    ("pretrained_cfg.std", [0, 1, 1], "pretrained_cfg.std must be 3 finite numbers > 0"),
    ("pretrained_cfg.std", [-0.2, 0.2, 0.2], "pretrained_cfg.std must be 3 finite numbers > 0"),
    ("pretrained_cfg.crop_pct", None, "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    ("pretrained_cfg.crop_pct", 0, "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    ("pretrained_cfg.crop_pct", 1.5, "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    ("pretrained_cfg.crop_pct", "0.9", "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    ("pretrained_cfg.crop_pct", NAN, "pretrained_cfg.crop_pct must be a number in (0, 1]"),
    ("pretrained_cfg.interpolation", "lanczos", "pretrained_cfg.interpolation must be one of"),
    ("pretrained_cfg.interpolation", 3, "pretrained_cfg.interpolation must be one of"),
    ("pretrained_cfg.license", {"id": "mit"}, "pretrained_cfg.license must be a str"),
    ("pretrained_cfg.license", 5, "pretrained_cfg.license must be a str"),
    ("architecture", ["convmixer"], "architecture must be a str"),
]


@pytest.mark.parametrize(
    "field,value,words", BAD, ids=[f"{f}={json.dumps(v)[:20]}" for f, v, _ in BAD]
)
def test_a_bad_value_in_config_json_is_exit_2_naming_the_field(
    offline, weights, tmp_path, capsys, field, value, words
):
    assert (
        convert(offline, weights, json.dumps(changed(field, value)).encode(), tmp_path / "out") == 2
    )
    line = one_error_line(capsys)
    assert words in line and "config.json of hf-hub:someone/convmixer" in line, line
    assert sorted(os.listdir(tmp_path)) == ["hub"]  # nothing written but the cache the test made


@pytest.mark.parametrize(
    "text,words",
    [
        (b"{not json", "cannot be read as JSON"),
        (b"\xff\xfe{}", "cannot be read as JSON"),
        (b"[1, 2, 3]", "must be a JSON object, got [1, 2, 3]"),
        (b"null", "must be a JSON object, got null"),
    ],
)
def test_a_config_json_that_is_not_a_json_object_is_exit_2(
    offline, weights, tmp_path, capsys, text, words
):
    assert convert(offline, weights, text, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert words in line and "config.json of hf-hub:someone/convmixer" in line, line
    assert not (tmp_path / "out").exists()


def front_matter_and_body(card: str):
    found = re.match(r"---\n(.*?)\n---\n(.*)", card, re.S)
    assert found, card[:300]
    return yaml.safe_load(found.group(1)), found.group(2)


HOSTILE = "mit\nlibrary_name: evil\n---\n<script>alert(1)</script>"


@pytest.mark.parametrize("license_", [HOSTILE, "mit: [unclosed", "apache-2.0"])
def test_outside_text_reaches_the_card_only_as_yaml_or_escaped_text(
    offline, weights, tmp_path, license_
):
    names = [f"<script>alert({i})</script>" for i in range(10)]
    config = changed("pretrained_cfg.license", license_)
    config["label_names"] = names
    revision = "<img src=x onerror=alert(2)>"
    hub_cache(
        offline,
        REPO_ID,
        {"model.safetensors": weights, "config.json": json.dumps(config).encode()},
        ref=revision,
    )
    from weights_converter.__main__ import main

    assert (
        main(
            [
                "--torch-ckpt",
                f"hf-hub:{REPO_ID}@{revision}",
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    front, body = front_matter_and_body((tmp_path / "out" / "README.md").read_text())
    assert front["license"] == license_ and front["library_name"] == "keras"
    assert front["base_model"] == REPO_ID and set(front) == {
        "library_name",
        "pipeline_tag",
        "tags",
        "base_model",
        "license",
    }
    assert "<script" not in body and "<img" not in body and "library_name" not in body


def test_a_checkpoint_file_name_reaches_the_card_escaped(tmp_path):
    from torch_helpers import save_checkpoint

    from weights_converter.__main__ import main

    path = save_checkpoint(
        timm_convmixer().state_dict(), tmp_path / "<img src=x onerror=alert(1)>.safetensors"
    )
    assert main(["--torch-ckpt", str(path), "--output", str(tmp_path / "out"), "--quiet"]) == 0
    front, body = front_matter_and_body((tmp_path / "out" / "README.md").read_text())
    assert front["library_name"] == "keras" and "<img" not in body
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;.safetensors" in body


# ------------------------------------------------------------------ numbers on the command lines


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--std", "nan,nan,nan"], "--std: expected 3 comma-separated finite numbers > 0"),
        (["--std", "inf,1,1"], "--std: expected 3 comma-separated finite numbers > 0"),
        (["--std", "0,1,1"], "--std: expected 3 comma-separated finite numbers > 0"),
        (["--mean", "nan,0,0"], "--mean: expected 3 comma-separated finite numbers"),
        (["--mean", "abc,0,0"], "--mean: expected 3 comma-separated finite numbers"),
        (["--input-size", "0"], "--input-size: must be a positive number and at most 4096"),
        (["--input-size", "1000000"], "--input-size: must be a positive number and at most 4096"),
        (["--crop-pct", "nan"], "--crop-pct: must be a number in (0, 1]"),
        (["--crop-pct", "1.5"], "--crop-pct: must be a number in (0, 1]"),
    ],
)
def test_evaluate_refuses_numbers_out_of_range(tmp_path, tiny_keras, capsys, argv, words):
    from convmixer_tf.evaluate.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--model", tiny_keras, "--data-dir", str(tmp_path), *argv])
    assert done.value.code == 2 and words in one_error_line(capsys)


@pytest.mark.parametrize("size", ["1000000", "0", "nan"])
def test_export_refuses_an_image_size_out_of_range(tmp_path, tiny_keras, capsys, size):
    from convmixer_tf.export.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--model", tiny_keras, "--image-size", size, "--output", str(tmp_path / "out")])
    assert (
        done.value.code == 2
        and "--image-size: must be a positive number and at most 4096" in one_error_line(capsys)
    )
    assert not (tmp_path / "out").exists()


def test_preprocessing_refuses_every_number_that_is_not_finite_and_in_range():
    from convmixer_tf.config import Preprocessing
    from convmixer_tf.errors import BadInput

    cases = [
        ({"std": (NAN, 1, 1)}, "std"),
        ({"std": (1, 1, INF)}, "std"),
        ({"mean": (NAN, 0, 0)}, "mean"),
        ({"crop_pct": NAN}, "crop_pct"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"input_size": 10**6}, "input_size"),
        ({"input_size": 2.5}, "input_size"),
        ({"interpolation": "x"}, "interpolation"),
    ]
    for changes, words in cases:
        with pytest.raises(BadInput, match=words):
            Preprocessing(**changes)
