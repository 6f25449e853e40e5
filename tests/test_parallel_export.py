"""Formats written side by side in worker processes: the job and the formats a worker gets
(a format a test adds is written there too), low memory written in one process, a worker
the kernel kills reported as what it is (exit 1, its formats, the signal, the way round),
never as a bug."""

import dataclasses
import os
import re
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
from convmixer_tf.errors import BadInput
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


def test_a_format_the_registry_does_not_list_is_written_by_a_worker_too(
    tmp_path, tiny, monkeypatch
):
    """A worker gets its formats pickled, as it gets the job: a format a test patches into
    FORMATS, in a group of its own, is written and checked by a worker like any other."""
    from test_architecture import COPY

    monkeypatch.setattr(
        registry, "FORMATS", (*registry.FORMATS, dataclasses.replace(COPY, group="elsewhere"))
    )
    options = exporters.ExportOptions(
        formats=("onnx", "keras_copy"), processes=2, verify_count=2, latency_runs=1
    )
    rows = exporters.export_formats(tiny, tmp_path, options)
    assert [row["format"] for row in rows] == ["onnx", "keras_copy"]
    assert all(row["passed"] for row in rows)
    assert rows[1]["pid"] != os.getpid()  # written and checked in a worker
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model_copy.keras"]


def test_a_job_travels_to_a_worker_whole(tiny):
    """What a worker process gets (a pickled job): the same model, computing the same
    outputs, its facts attached, the options, and resources of its own."""
    import pickle

    from convmixer_tf.export.run import prepare_job

    options = exporters.ExportOptions(formats=("tflite_int8",), nchw=True, opset=15)
    job, held_out = prepare_job(tiny, options, calibrated=True)
    job.scratch()
    try:
        copy = pickle.loads(pickle.dumps(job))
        np.testing.assert_array_equal(
            copy.model.predict(held_out, verbose=0), job.model.predict(held_out, verbose=0)
        )
        assert copy.facts == job.facts and job.facts.raw_rgb
        assert (copy.nchw, copy.opset) == (True, 15)
        assert copy.calibration_source == job.calibration_source != ""
        np.testing.assert_array_equal(copy.calibration, job.calibration)
        assert "scratch" in job.made and copy.made == {} and copy.cleanup is not job.cleanup
    finally:
        job.close()


def test_a_failure_here_stops_the_workers(tmp_path, tiny, monkeypatch):
    """A format of this process that fails ends the run at once: the workers are killed and
    waited for, not left computing."""
    verify = sys.modules["convmixer_tf.export.verify"]  # the package's face shows its function

    def failing(check, reference):
        raise exporters.ExportError("a check that fails here")

    monkeypatch.setattr(verify, "compare", failing)  # in this process only
    options = exporters.ExportOptions(formats=("onnx", "tflite_int8"), processes=2, verify_count=2)
    with pytest.raises(exporters.ExportError, match="a check that fails here"):
        exporters.export_formats(tiny, tmp_path, options)
    assert workers_of(os.getpid()) == []


def refusing_write(job, path):
    raise BadInput("refused by its writer")


@pytest.mark.slow
def test_a_failure_in_a_worker_is_raised_here_as_what_it_is(tmp_path, tiny):
    """A worker's exception comes back with its kind and message (here BadInput, from a
    format's writer), so the exit code is the one it would be here."""
    from convmixer_tf.export.run import prepare_job

    plugin = registry.ExportFormat(
        name="refusing", filename="x.bin", summary="", write=refusing_write, load=None
    )
    options = exporters.ExportOptions(formats=("onnx",), verify_count=2)
    job, held_out = prepare_job(tiny, options, calibrated=False)
    try:
        with pytest.raises(BadInput, match="refused by its writer"):
            parallel.write_in_processes(
                {"main": [], "other": [plugin]}, job, tmp_path, held_out, held_out, log=print
            )
    finally:
        job.close()
    assert workers_of(os.getpid()) == []


def test_low_memory_writes_every_file_in_this_process(tmp_path, tiny, monkeypatch):
    """Where the memory available does not cover a run side by side, no worker starts."""
    from convmixer_tf.export import run

    assert not parallel.memory_allows(SimpleNamespace(count_params=lambda: 10**12))
    monkeypatch.setattr(run, "memory_allows", lambda model: False)
    monkeypatch.setattr(run, "cores", lambda: 2)

    def no_workers(*args, **kwargs):
        raise AssertionError("formats written side by side")

    monkeypatch.setattr(run, "write_in_processes", no_workers)
    options = exporters.ExportOptions(formats=("onnx", "tflite"), verify_count=2, latency_runs=1)
    rows = exporters.export_formats(tiny, tmp_path, options)
    assert [row["format"] for row in rows] == ["onnx", "tflite"] and all(r["passed"] for r in rows)


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
    os.kill(worker, signal.SIGKILL)  # what the out-of-memory killer sends
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err[-3000:]
    assert len(lines) == 1, lines
    # the formats of the one process killed (either of the two)
    assert re.match(r"error: the process writing (tflite|tflite_int8) was killed", lines[0]), lines
    assert "by signal 9 (SIGKILL)" in lines[0] and "--processes 1" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not [w for w in workers_of(proc.pid) if alive(w)]
    done = subprocess.run(
        [*command, "--processes", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the way round the message gives
