"""Training across processes on JAX's distributed runtime: real processes on localhost
(CPU, one device each, gloo collectives), against one process with two devices and one
process with one device."""

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import randomize_batchnorm

import convmixer_tf
from convmixer_tf.augment import AugmentConfig, Augmenter
from convmixer_tf.data import open_dataset
from convmixer_tf.pipelines import Shard, epoch_order, shard_of_epoch, train_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRONG_SHARD = os.path.join(REPO, "tests", "scripts", "train_wrong_shard.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_example_once_per_epoch_across_processes():
    order = epoch_order(52, seed=3, epoch=0)
    shards = [shard_of_epoch(order, 8, Shard(i, 2)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 24  # 6 whole global batches of 8, 4 per process each
    assert sorted(np.concatenate(shards).tolist()) == sorted(order[:48].tolist())
    # Global batch b of one process is what processes 0 and 1 contribute to step b, in order.
    assert np.concatenate([shards[0][:4], shards[1][:4]]).tolist() == order[:8].tolist()
    assert epoch_order(52, 3, 1).tolist() != order.tolist()  # reshuffled every epoch


def test_sharded_pipeline_sees_each_image_once(tmp_path):
    """A folder whose images carry their id as their colour, read by both processes' pipelines."""
    import tensorflow as tf

    for i in range(40):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        tf.io.write_file(
            str(folder / f"{i:02d}.png"), tf.io.encode_png(np.full((8, 8, 3), i * 5, np.uint8))
        )
    source = open_dataset(data_dir=tmp_path, val_fraction=0.0)
    augment = Augmenter(AugmentConfig(randaugment_n=0, hflip=False), 8, 2)
    for epoch in range(2):
        seen = []
        for index in range(2):
            ds = train_pipeline(source, augment, 8, seed=7, shard=Shard(index, 2))
            for images, _ in ds.skip(epoch * 5).take(5):  # 40 // 8 = 5 steps per epoch
                seen += (np.asarray(images)[:, 0, 0, 0] / 5).round().astype(int).tolist()
        assert sorted(seen) == list(range(40)), epoch  # exactly once, across the two processes


def test_multi_process_on_tensorflow_is_a_clear_error(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=REPO)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_tf.train",
            "--data-dir",
            str(tmp_path),
            "--distribute",
            "multi-process",
            "--output",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: --distribute multi-process needs the JAX backend (KERAS_BACKEND=jax): TensorFlow's "
        "MultiWorkerMirroredStrategy does not work with Keras 3's fit (keras-team/keras#20585; see the README)"
    ]


# ------------------------------------------------------------------ real processes


def readme_commands(doc="docs/several-machines.md"):
    """The commands of "Training on several machines" for two processes, as written there
    (continuation lines joined), without their environment assignment."""
    text = open(os.path.join(REPO, doc)).read()
    lines = (
        text[text.index("# host A (process 0") :].split("\n\n")[0].replace("\\\n", " ").splitlines()
    )
    commands = [shlex.split(line) for line in lines if "convmixer_tf.train" in line]
    assert len(commands) == 2 and all(c[0] == "KERAS_BACKEND=jax" for c in commands), commands
    return [c[1:] for c in commands]


@pytest.mark.slow
def test_the_readmes_two_process_command_with_the_default_recipe(tmp_path):
    """The README's command, as written (augmentation and every other default on), only
    pointed at a small folder here and made short: two real processes train together."""
    from conftest import write_folder

    data = write_folder(tmp_path / "flowers", per_class=12, size=(36, 36))
    port = free_port()
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        PYTHONPATH=REPO,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    procs = []
    for command in readme_commands():
        command = [
            sys.executable
            if word == "python"
            else word.replace("/shared/flowers", data)
            .replace("/shared/runs/flowers", str(tmp_path / "run"))
            .replace("hostA:12355", f"127.0.0.1:{port}")
            for word in command
        ]
        short = [
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--steps-per-epoch",
            "2",
            "--image-size",
            "32",
            "--json",
        ]
        procs.append(
            subprocess.Popen(
                command + short, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    metrics = json.loads(results[0][0])
    assert metrics["processes"] == 2 and np.isfinite(metrics["final"]["loss"])
    settings = json.load(open(tmp_path / "run" / "config.json"))
    # the default recipe
    assert settings["augment"] == json.loads(json.dumps(dataclasses.asdict(AugmentConfig())))
    assert settings["augment"]["randaugment_n"] > 0 and settings["augment"]["hflip"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """ConvMixer-256/8 with randomised BatchNorm, and a small generated image folder."""
    from conftest import write_folder

    root = tmp_path_factory.mktemp("mp")
    model = randomize_batchnorm(convmixer_tf.create_model("convmixer_256_8", num_classes=3), seed=5)
    convmixer_tf.save_model(model, root / "init.keras")
    data = write_folder(root / "data", per_class=24, size=(32, 32))  # 72 images: 65 train, 7 val
    return str(root / "init.keras"), data


def _train(
    setup, out, *extra, backend="jax", devices=1, script=None, processes=None, port=None, index=None
):
    init, data = setup
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        PYTHONPATH=REPO,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    # Augmentation off: test_two_processes_train_what_one_process_trains compares two processes'
    # weights with one process's, and each process draws its own flips and RandAugment ops; the
    # other tests share these settings to stay short. The default recipe, augmentation on, is
    # test_the_readmes_two_process_command_with_the_default_recipe.
    args = [
        "--init",
        init,
        "--data-dir",
        data,
        "--val-fraction",
        "0.097",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--steps-per-epoch",
        "3",
        "--ra-n",
        "0",
        "--no-flip",
        "--lr",
        "0.01",
        "--output",
        str(out),
        "--no-tensorboard",
        "--quiet",
        *extra,
    ]
    if processes:
        args += [
            "--distribute",
            "multi-process",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(processes),
            "--process-id",
            str(index),
            "--heartbeat-timeout",
            "10",
        ]
    command = [sys.executable, script] if script else [sys.executable, "-m", "convmixer_tf.train"]
    return subprocess.Popen(
        command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _two_processes(setup, out, script=None, *extra):
    port = free_port()
    procs = [
        _train(setup, out, *extra, processes=2, port=port, index=i, script=script) for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return procs


def _weights(out):
    import keras

    return [
        np.asarray(w)
        for w in keras.models.load_model(os.path.join(out, "model.keras")).get_weights()
    ]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, setup):
    # a few steps: float sums reorder between device counts
    steps = (
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
    )
    _two_processes(setup, tmp_path / "two_processes", None, *steps)
    for name, kwargs in (
        ("two_devices", dict(devices=2, extra=("--distribute", "data-parallel"))),
        ("one_device", dict(extra=("--distribute", "none"))),
    ):
        p = _train(
            setup,
            tmp_path / name,
            *steps,
            *kwargs.get("extra", ()),
            devices=kwargs.get("devices", 1),
        )
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    two, devices, one = (
        _weights(tmp_path / n) for n in ("two_processes", "two_devices", "one_device")
    )
    start = [
        np.asarray(w)
        for w in randomize_batchnorm(
            convmixer_tf.create_model("convmixer_256_8", num_classes=3), seed=5
        ).get_weights()
    ]
    moved = _max_diff(one, start)
    assert moved > 1e-3  # the steps moved the weights
    # Two processes run the two-device program: the same sums in the same order.
    assert _max_diff(two, devices) == 0.0
    # One device adds the halves of each batch in another order, and Adam scales the rounding up on weights
    # whose gradients are near zero (measured: 7.5e-6 of how far the weights moved). A wrong shard moves
    # them apart by most of that distance, so the same bound tells the two apart below.
    bound = 1e-4 * moved
    assert _max_diff(two, one) < bound, (_max_diff(two, one), moved)
    metrics = [
        json.load(open(tmp_path / n / "metrics.json")) for n in ("two_processes", "one_device")
    ]
    assert metrics[0]["processes"] == 2 and metrics[0]["devices"] == 2
    for key in ("val_accuracy", "val_loss"):  # the whole validation set, once
        assert metrics[0]["final"][key] == pytest.approx(metrics[1]["final"][key], abs=1e-5), key
    # Only process 0 writes the run's files.
    assert sorted(os.listdir(tmp_path / "two_processes")) == [
        "RECORD",
        "checkpoint.weights.h5",
        "config.json",
        "history.csv",
        "metrics.json",
        "model.keras",
    ]
    # The check can fail: both processes training on process 0's shard.
    _two_processes(setup, tmp_path / "wrong_shard", WRONG_SHARD, *steps)
    assert _max_diff(_weights(tmp_path / "wrong_shard"), one) > bound


@pytest.mark.slow
def test_killed_processes_resume_together(tmp_path, setup):
    out = tmp_path / "run"
    port = free_port()
    extra = ("--epochs", "4")
    procs = [_train(setup, out, *extra, processes=2, port=port, index=i) for i in range(2)]
    backups = [out / "backup" / f"process{i}" / "training_metadata.json" for i in range(2)]
    deadline = time.time() + 300
    while (
        not all(b.exists() for b in backups)
        and time.time() < deadline
        and all(p.poll() is None for p in procs)
    ):
        time.sleep(0.05)
    for p in procs:  # in epoch 2 (or later): the first epoch is in every backup
        p.send_signal(signal.SIGKILL)
        p.wait()
    done = [json.loads(b.read_text())["epoch"] for b in backups]
    assert done[0] == done[1] >= 1 and not (out / "metrics.json").exists()
    port = free_port()
    procs = [
        _train(setup, out, *extra, "--json", processes=2, port=port, index=i) for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:]
    metrics = json.loads(results[0][0])
    assert metrics["resumed"] and metrics["epochs_this_session"] == 4 - done[0]
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2, 3]
    lines = (out / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "3"]  # one row per epoch


@pytest.mark.slow
def test_when_one_process_dies_the_other_stops(tmp_path, setup):
    port = free_port()
    procs = [
        _train(setup, tmp_path / "run", "--epochs", "200", processes=2, port=port, index=i)
        for i in range(2)
    ]
    metadata = tmp_path / "run" / "backup" / "process1" / "training_metadata.json"
    deadline = time.time() + 300
    while not metadata.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "training ended before the kill"
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)
    waited = time.time() - killed
    assert procs[0].returncode != 0
    assert waited < 10 + 30, waited  # the heartbeat timeout, and the runtime's own shutdown
    assert "error:" in err, err[-2000:]


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_still_fails_with_keras_fit():
    """Why multi-process training is JAX only: if this starts to pass, support TensorFlow too."""
    ports = [str(free_port()), str(free_port())]
    script = os.path.join(REPO, "tests", "scripts", "mwms_fit.py")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), *ports],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for out in outs:
        assert "FIT FAILED ValueError Attempt to convert a value (PerReplica" in out, out[-2000:]
