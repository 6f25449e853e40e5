"""Formats written side by side in worker processes: plug-in formats still written, a worker
that hangs stopped after a bound derived from the work, a worker the kernel kills reported
as what it is (exit 1, its formats, the signal, the way round), never as a bug."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import randomize_batchnorm
from test_interrupts import alive, mapped, start, workers_of

import convmixer_tf
from convmixer_tf import export as exporters
from convmixer_tf.export import parallel, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=7,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    return randomize_batchnorm(model)


class KerasCopyRunner:
    output = "logits"

    def __init__(self, path, threads=2):
        import keras

        self.model = keras.models.load_model(path, compile=False)

    def __call__(self, images):
        return np.asarray(self.model.predict(images, verbose=0))


def test_a_registered_format_is_written_when_formats_go_side_by_side(tmp_path, tiny):
    """Workers are fresh interpreters that know the built-in formats only: a plug-in is
    written by the process that registered it, whatever group it names."""
    plugin = registry.ExportFormat(
        name="keras_copy",
        filename="copy.keras",
        summary="the export graph as a .keras file (test only)",
        write=lambda job, path: job.model.save(path),
        load=KerasCopyRunner,
        tolerance=1e-6,
        recognises=lambda path: str(path).endswith("copy.keras"),
        group="elsewhere",
    )
    with registry.registered(plugin):
        options = exporters.ExportOptions(
            formats=("onnx", "keras_copy", "tflite"), processes=2, verify_count=2, latency_runs=1
        )
        rows = exporters.export_formats(tiny, tmp_path, options)
    assert [row["format"] for row in rows] == ["onnx", "keras_copy", "tflite"]
    assert all(row["passed"] for row in rows)
    assert sorted(os.listdir(tmp_path)) == ["copy.keras", "model.onnx", "model.tflite"]


def test_a_worker_that_runs_past_its_bound_is_stopped(tmp_path, tiny, monkeypatch):
    # less than a worker's start-up
    monkeypatch.setattr(parallel, "time_allowed", lambda job, formats: 1.0)
    started = time.monotonic()
    with pytest.raises(
        exporters.ExportError,
        match=r"the process writing tflite, tflite_float16 did not finish "
        r"within 1 s",
    ):
        options = exporters.ExportOptions(
            formats=("onnx", "tflite", "tflite_float16"), processes=2, verify_count=2
        )
        exporters.export_formats(tiny, tmp_path, options)
    assert time.monotonic() - started < 60
    assert workers_of(os.getpid()) == []


def test_the_bound_grows_with_the_work():
    def job(params, calibration=None):
        model = SimpleNamespace(count_params=lambda: params)
        return SimpleNamespace(model=model, calibration=calibration)

    tflite, float16, int8 = (
        registry.get(name) for name in ("tflite", "tflite_float16", "tflite_int8")
    )
    small = parallel.time_allowed(job(10_000), [tflite])
    assert small < parallel.time_allowed(job(10_000), [tflite, float16])
    assert small < parallel.time_allowed(job(21_000_000), [tflite])
    images = np.zeros((64, 32, 32, 3), np.float32)
    assert parallel.time_allowed(job(10_000, images), [int8]) > parallel.time_allowed(
        job(10_000), [int8]
    )


@pytest.mark.slow
def test_a_worker_the_kernel_kills_is_exit_1_naming_its_formats(tmp_path, tiny):
    model = tmp_path / "model.keras"
    convmixer_tf.save_model(tiny, model)
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.export",
        "--model",
        str(model),
        "--formats",
        "saved_model",
        "tflite",
        "tflite_int8",
        "--calibration-count",
        "4",
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    ]
    proc = start([*command, "--processes", "3"], tmp_path)
    deadline, worker = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and worker is None:
        ready = [w for w in workers_of(proc.pid) if "libtensorflow" in mapped(w)]
        worker = ready[0] if ready else None
        time.sleep(0.05)
    assert worker is not None, "no export worker started"
    with open(f"/proc/{worker}/cmdline", "rb") as f:
        spec = f.read().split(b"\0")[3].decode()
    os.kill(worker, signal.SIGKILL)  # what the out-of-memory killer sends
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: the process writing tflite"), lines
    assert "killed by signal 9 (SIGKILL)" in lines[0] and "--processes 1" in lines[0], lines[0]
    assert os.path.basename(spec).split(".")[0] in ("tflite-float", "tflite-int8")
    assert not (tmp_path / "out").exists() and not [w for w in workers_of(proc.pid) if alive(w)]
    done = subprocess.run(
        [*command, "--processes", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the way round the message gives
