"""The project as a pip user gets it: its wheel (the `wheel` fixture) installed into fresh
virtual environments, no TensorFlow, no repository and no node_modules/. With the web
extra alone, `convmixer-web` serves the page from there with the MediaPipe copy the wheel
carries, and the page classifies in Chromium with MediaPipe Python's scores; every console
script of the wheel answers --help there. With the runtime extra alone, `convmixer-predict`
classifies with the .onnx and .tflite files as this checkout's predict does."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import DIGIT_NAMES, fresh_venv
from test_web import browser, classify, digit_pngs, mediapipe_scores, open_page, served

pytestmark = pytest.mark.slow
__all__ = ["browser", "digit_pngs"]  # fixtures of test_web.py used here


@pytest.fixture(scope="module")
def web_venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel and its web extra: its bin/."""
    return fresh_venv(tmp_path_factory.mktemp("venv") / "web", f"{wheel}[web]")


@pytest.fixture
def outside(tmp_path):
    """A working folder outside the repository, and an environment that points nowhere
    into it: (cwd, env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONVMIXER_MEDIAPIPE")}
    return tmp_path, env


def test_the_wheel_carries_the_page_and_mediapipe_with_its_licence(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        folder = "convmixer_tf/web/tasks-vision/"
        metadata = json.loads(archive.read(folder + "package.json"))
        notice = archive.read(folder + "NOTICE").decode()
        licence = archive.read(folder + "LICENSE").decode()
    assert {
        f"convmixer_tf/web/page/{name}" for name in ("index.html", "app.js", "style.css")
    } <= names
    wasm = {
        "vision_bundle.mjs",
        "wasm/vision_wasm_internal.wasm",
        "wasm/vision_wasm_nosimd_internal.wasm",
    }
    assert {folder + name for name in wasm} <= names
    assert (metadata["name"], metadata["version"], metadata["license"]) == (
        "@mediapipe/tasks-vision",
        "1.1.0",
        "Apache-2.0",
    )
    assert "@mediapipe/tasks-vision 1.1.0" in notice and "Apache License" in notice
    assert licence.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in licence


def test_the_installed_page_classifies_as_mediapipe_does(
    web_venv, outside, browser, exported, digit_pngs
):
    cwd, env = outside
    where = subprocess.run(
        [
            web_venv / "python",
            "-c",
            "import convmixer_tf.web as w; print(w.__file__, w.find_mediapipe())",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    site_packages = str(web_venv.parent / "lib")
    assert all(path.startswith(site_packages) for path in where), where  # the wheel's copy
    no_tf = subprocess.run([web_venv / "python", "-c", "import tensorflow"], capture_output=True)
    assert no_tf.returncode != 0  # the web extra brings no TensorFlow

    model = exported / "model_int8.tflite"
    paths, labels = digit_pngs
    expected = mediapipe_scores(model, paths)
    command = [web_venv / "convmixer-web", "--model", str(model)]
    with served(command=command, cwd=cwd, env=env) as address:
        page, requests = open_page(browser, address)
        for path, label, scores in zip(paths, labels, expected):
            top = classify(page, path)
            assert top[0][1] == DIGIT_NAMES[label], (path, top)
            got = [score for _, _, score in top]
            np.testing.assert_allclose(got, np.sort(scores)[::-1][:5], rtol=0, atol=0)
        page.screenshot(path=cwd / "wheel.png")
        assert all(url.startswith(address) for url in requests)


def test_every_console_script_answers_help_without_tensorflow(wheel, web_venv, outside):
    cwd, env = outside
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        lines = archive.read(entry_points).decode().split("[console_scripts]")[1].splitlines()
    scripts = [line.split("=")[0].strip() for line in lines if "=" in line]
    assert "convmixer-web" in scripts and len(scripts) >= 6
    for script in scripts:
        done = subprocess.run(
            [web_venv / script, "--help"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and done.stdout.startswith("usage:"), (
            script,
            done.stderr[-2000:],
        )


@pytest.fixture(scope="module")
def runtime_venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel and its runtime extra: its bin/."""
    return fresh_venv(tmp_path_factory.mktemp("venv") / "runtime", f"{wheel}[runtime]")


@pytest.mark.parametrize("name", ["model_int8.onnx", "model.onnx", "model_int8.tflite"])
def test_the_runtime_extra_alone_classifies_with_onnx_and_tflite(
    runtime_venv, outside, exported, digit_pngs, name
):
    cwd, env = outside
    assert subprocess.run([runtime_venv / "python", "-c", "import tensorflow"]).returncode != 0
    paths, labels = digit_pngs
    command = ["--model", str(exported / name), *map(str, paths), "--json", "--top-k", "3"]
    installed = subprocess.run(
        [runtime_venv / "convmixer-predict", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    here = subprocess.run(
        [sys.executable, "-m", "convmixer_tf.predict", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert here.returncode == 0, here.stderr[-2000:]
    got = [json.loads(line) for line in installed.stdout.splitlines()]
    assert got == [json.loads(line) for line in here.stdout.splitlines()]
    assert [row["top"][0]["name"] for row in got] == [DIGIT_NAMES[label] for label in labels]
