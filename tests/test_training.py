"""Training, fine-tuning, evaluation, data pipelines and devices, on tiny models and data
made here (nothing is downloaded)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import COLOURS, write_folder

from convmixer_tf import ConvMixer
from convmixer_tf.augment import AugmentConfig, Augmenter, random_resized_crop
from convmixer_tf.config import Preprocessing
from convmixer_tf.data import open_dataset
from convmixer_tf.evaluate import evaluate
from convmixer_tf.images import decoded, eval_transform, list_images
from convmixer_tf.model import rebuild
from convmixer_tf.train.optim import BackboneScaledAdamW, OneCycle
from convmixer_tf.train.run import TrainConfig, TrainingError, read_history, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_AUG = AugmentConfig(randaugment_n=0, hflip=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init") / "tiny.keras")
    ConvMixer(
        dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=5, input_shape=(32, 32, 3)
    ).save(path)
    return path


def quick(tmp_path, tiny_file, folder, **overrides):
    settings = dict(
        init=tiny_file,
        data_dir=folder,
        epochs=2,
        batch_size=8,
        lr=0.01,
        augment=NO_AUG,
        output=str(tmp_path / "run"),
        verbose=0,
        tensorboard=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# ------------------------------------------------------------------ recipe pieces


def test_one_cycle_is_the_papers_interpolation():
    total, peak = 1000, 0.05
    schedule = OneCycle(peak, total)
    steps = np.array([0, 1, 123, 400, 555, 800, 901, 999, 1000])
    expected = np.interp(steps / total, [0, 0.4, 0.8, 1.0], [0, peak, peak / 20, 0])
    got = np.array([float(schedule(s)) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_random_resized_crop_full_scale_square_keeps_the_image():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 3)), tf.uint8)
    out = random_resized_crop(image, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out.numpy(), image.numpy().astype(np.float32), atol=1e-3)


def test_random_resized_crop_falls_back_to_centre_crop():
    # Area 1.0 at ratio 1 cannot fit a 20x40 image: torchvision takes the centre 20x20.
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255
    out = random_resized_crop(tf.constant(image), 20, scale=(1.0, 1.0), ratio=(1.0, 1.0)).numpy()
    np.testing.assert_allclose(out, 255.0, atol=1e-3)


def test_random_resized_crop_samples_area_in_range():
    # A gradient image: a crop's mean column index tells which part was taken.
    ramp = np.tile(np.arange(100, dtype=np.float32)[None, :, None], (100, 1, 3))
    crops = [
        random_resized_crop(tf.constant(ramp), 10, scale=(0.1, 0.2), ratio=(1.0, 1.0)).numpy()
        for _ in range(20)
    ]
    spans = [c[0, -1, 0] - c[0, 0, 0] for c in crops]
    # side between sqrt(0.1) and sqrt(0.2) of 100 px: 31.6..44.7 px, minus resampling edges
    assert all(20 < s < 45 for s in spans), spans


def test_augmenter_shapes_ranges_and_mixed_labels():
    config = AugmentConfig(
        scale=(0.35, 1.0),
        randaugment_n=2,
        randaugment_m=12,
        jitter=0.1,
        erasing=0.5,
        mixup=0.8,
        cutmix=1.0,
    )
    augmenter = Augmenter(config, 24, num_classes=4, seed=1)
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (30, 40, 3)), tf.uint8)
    x, y = augmenter.image(image, tf.constant(2, tf.int32))
    assert x.shape == (24, 24, 3) and x.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0
    np.testing.assert_array_equal(y.numpy(), [0, 0, 1, 0])
    images = tf.stack([augmenter.image(image, tf.constant(i % 4))[0] for i in range(8)])
    labels = tf.one_hot(np.arange(8) % 4, 4)
    mixed_x, mixed_y = augmenter.batch(images, labels)
    assert mixed_x.shape == (8, 24, 24, 3)
    np.testing.assert_allclose(mixed_y.numpy().sum(axis=1), 1.0, atol=1e-5)
    assert (mixed_y.numpy().max(axis=1) < 1.0).any(), "no label was mixed"


def test_augment_config_rejects_bad_values():
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="randaugment"):
        AugmentConfig(randaugment_m=40)
    with pytest.raises(ValueError, match="erasing"):
        AugmentConfig(erasing=2.0)


# ------------------------------------------------------------------ data sources


def test_folder_split_and_train_val_layout(tmp_path, folder):
    source = open_dataset(data_dir=folder, val_fraction=0.25)
    assert source.class_names == ["class0", "class1", "class2"]
    assert (source.train_size, source.val_size) == (54, 18)
    image, label = next(iter(source.train))
    assert image.dtype == tf.uint8 and image.shape == (40, 48, 3) and label.dtype == tf.int32

    write_folder(tmp_path / "split" / "train", per_class=4)
    write_folder(tmp_path / "split" / "val", per_class=2, seed=1)
    source = open_dataset(data_dir=tmp_path / "split")
    assert (source.train_size, source.val_size) == (12, 6)
    assert sorted(int(y) for _, y in source.val) == [0, 0, 1, 1, 2, 2]


def test_bad_data_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_dataset(data_dir=tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="one sub-folder of images per class"):
        open_dataset(data_dir=tmp_path / "flat")
    with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_set'"):
        open_dataset("no_such_set")
    with pytest.raises(ValueError, match="exactly one"):
        open_dataset()


def test_offline_never_downloads(tmp_path):
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match="not prepared.*--offline"):
        open_dataset("cifar10", tfds_data_dir=str(data_dir), offline=True)
    assert not data_dir.exists() or not any(data_dir.rglob("*.tar.gz"))


def test_tfds_mock_data_trains_with_the_full_recipe(tmp_path, tiny_file):
    tfds = pytest.importorskip("tensorflow_datasets")
    augment = AugmentConfig(scale=(0.35, 1.0), jitter=0.1, erasing=0.25, mixup=0.2, cutmix=1.0)
    with tfds.testing.mock_data(num_examples=32):
        metrics = train(
            TrainConfig(
                init=tiny_file,
                dataset="cifar10",
                epochs=1,
                batch_size=8,
                augment=augment,
                label_smoothing=0.1,
                output=str(tmp_path / "run"),
                verbose=0,
            )
        )
    assert metrics["num_classes"] == 10 and metrics["epochs"] == 1
    assert np.isfinite(metrics["final"]["loss"]) and "val_top5" in metrics["final"]
    assert os.path.isdir(tmp_path / "run" / "logs")
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert model.output_shape == (None, 10) and model.get_layer("preprocessing")


# ------------------------------------------------------------------ training


def test_loss_falls_on_a_learnable_task(tmp_path, tiny_file, folder):
    metrics = train(quick(tmp_path, tiny_file, folder, epochs=6, lr=0.01, val_fraction=0.25))
    history = metrics["history"]
    assert [row["epoch"] for row in history] == list(range(6))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    assert history[-1]["val_accuracy"] >= 0.9, history
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"] == history[-1] and saved["train_images_per_second"] > 0


def test_finished_run_and_changed_settings_are_refused(tmp_path, tiny_file, folder):
    train(quick(tmp_path, tiny_file, folder, epochs=1))
    with pytest.raises(ValueError, match="finished run"):
        train(quick(tmp_path, tiny_file, folder, epochs=1))
    os.remove(tmp_path / "run" / "metrics.json")
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train(quick(tmp_path, tiny_file, folder, epochs=1, lr=0.5))
    metrics = train(quick(tmp_path, tiny_file, folder, epochs=1, lr=0.5, force=True))
    assert metrics["epochs"] == 1 and not metrics["resumed"]


def test_fine_tune_new_head_with_frozen_backbone(tmp_path, tiny_file, folder):
    init = keras.models.load_model(tiny_file)
    from conftest import randomize_batchnorm

    randomize_batchnorm(init)
    init_path = str(tmp_path / "init.keras")
    init.save(init_path)
    train(quick(tmp_path, init_path, folder, freeze_backbone=True))
    tuned = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert tuned.get_layer("head").units == 3
    for layer in init.layers:
        if layer.weights and layer.name != "head":  # weights and BN statistics untouched
            for a, b in zip(layer.get_weights(), tuned.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    # The init model has no preprocessing layer: the tuned one takes raw RGB with ImageNet mean/std.
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    mean, std = np.array(Preprocessing().mean), np.array(Preprocessing().std)
    features = keras.Model(tuned.input, tuned.get_layer("avg_pool").output)(x)
    reference = keras.Model(init.input, init.get_layer("avg_pool").output)(
        ((x / 255 - mean) / std).astype("float32")
    )
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_backbone_learning_rate_multiplier():
    source = ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=3, input_shape=(16, 16, 3)
    )
    model = rebuild(source)
    model.compile(
        optimizer=BackboneScaledAdamW(backbone_lr_mult=1e-3, learning_rate=0.1, weight_decay=0.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    before = {w.path: np.array(w) for w in model.trainable_weights}
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    model.train_on_batch(x, np.eye(3)[[0, 1, 2, 0]])
    change = {w.path: np.abs(np.array(w) - before[w.path]).max() for w in model.trainable_weights}
    # Adam's first step moves each weight by about lr, whatever the gradient's size.
    assert 0.05 < change["head/kernel"] <= 0.1 * 1.001
    assert 0.5e-4 < change["stem_conv/kernel"] <= 1e-4 * 1.001


def test_mixed_precision_keeps_logits_float32(tiny_file):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = rebuild(keras.models.load_model(tiny_file))
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("block0_pw_conv").compute_dtype == "bfloat16"
    assert model.get_layer("head").compute_dtype == "float32"
    assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float32"


def test_fp16_gets_loss_scaling(tiny_file):
    from convmixer_tf.train.optim import compile_model

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = rebuild(keras.models.load_model(tiny_file))
        compile_model(model, TrainConfig(), steps_per_epoch=10)
    finally:
        keras.config.set_dtype_policy(previous)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_mixed_precision_run_saves_a_float32_model(tmp_path, tiny_file, folder, precision):
    train(quick(tmp_path, tiny_file, folder, epochs=1, precision=precision))
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert {w.dtype for w in model.weights} == {"float32"}
    assert all(layer.compute_dtype == "float32" for layer in model.layers)


def test_nan_loss_stops_with_a_clear_error_and_keeps_no_diverged_state(tmp_path, tiny_file, folder):
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1.*no epoch finished"):
        train(quick(tmp_path, tiny_file, folder, lr=1e30, clip_norm=None, batch_size=4))
    run = tmp_path / "run"
    for name in ("model.keras", "metrics.json", "checkpoint.weights.h5", "backup"):
        assert not (run / name).exists(), name


def _cli(*args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_killed_run_resumes_and_loses_no_finished_epoch(tmp_path, tiny_file, folder):
    out = tmp_path / "run"
    command = [
        "convmixer_tf.train",
        "--init",
        tiny_file,
        "--data-dir",
        folder,
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--output",
        str(out),
        "--no-tensorboard",
        "--quiet",
    ]
    first = _cli(*command)
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 120
    while not metadata.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert metadata.exists(), "no epoch finished before the kill"
    finished = json.loads(metadata.read_text())["epoch"]
    before = read_history(out / "history.csv")[:finished]
    assert (
        finished < 4 and not (out / "metrics.json").exists() and not (out / "model.keras").exists()
    )

    second = _cli(*command, "--json")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["resumed"] and metrics["epochs_this_session"] == 4 - finished
    assert [row["epoch"] for row in metrics["history"]] == [0, 1, 2, 3]
    assert metrics["history"][:finished] == before  # the finished epochs, intact
    steps_per_epoch = len(list(open_dataset(data_dir=folder).train)) // 4
    assert metrics["optimizer_steps"] == 4 * steps_per_epoch  # optimiser state restored too


def test_train_cli_bad_input_exit_2(tmp_path, folder, capsys):
    from convmixer_tf.train.__main__ import main

    assert main(["--dataset", "no_such_set", "--output", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown tfds dataset" in err[0]
    assert (
        main(["--data-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "b"), "--quiet"])
        == 2
    )
    assert "--data-dir not found" in capsys.readouterr().err
    assert main(["--init", str(tmp_path / "x.keras"), "--data-dir", str(tmp_path), "--quiet"]) == 2
    capsys.readouterr()
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    assert (
        main(
            [
                "--init",
                str(tmp_path / "broken.keras"),
                "--data-dir",
                folder,
                "--output",
                str(tmp_path / "c"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "cannot load --init" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ devices


@pytest.mark.parametrize(
    "backend,kind",
    [pytest.param("tensorflow", "mirrored", marks=pytest.mark.slow), ("jax", "data-parallel")],
)
def test_two_devices_agree_with_one(backend, kind):
    if backend == "jax":
        pytest.importorskip("jax")
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        PYTHONPATH=REPO,
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "scripts", "distributed_step.py"), kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["kind"] == kind
    np.testing.assert_allclose(result["loss_multi"], result["loss_single"], rtol=1e-5)
    assert result["max_weight_change"] > 1e-2  # the steps did move the weights
    assert result["max_weight_diff"] < 1e-5


# ------------------------------------------------------------------ evaluation


def test_evaluation_equals_a_hand_computation(tmp_path):
    root = write_folder(
        tmp_path / "eval", per_class=3, size=(30, 37), classes=COLOURS + [(120, 120, 120)] * 3
    )
    model = ConvMixer(
        dim=16,
        depth=2,
        kernel_size=3,
        patch_size=4,
        num_classes=6,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    from conftest import randomize_batchnorm

    randomize_batchnorm(model)
    prep = Preprocessing(input_size=32, crop_pct=0.875, interpolation="bicubic")
    source = open_dataset(data_dir=root, val_fraction=0.0)
    got = evaluate(model, source.train, prep, batch_size=5)

    # the transform evaluate runs (TensorFlow's, in its pipeline), image by image
    paths = list_images(root)
    images = np.stack([eval_transform(decoded(p), prep, normalize=False) for p in paths])
    labels = [int(os.path.basename(os.path.dirname(p))[len("class") :]) for p in paths]
    logits = np.asarray(model.predict(images, verbose=0), np.float64)
    loss = top1 = top5 = 0
    for row, label in zip(logits, labels):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        loss -= np.log(probs[label])
        ranked = sorted(range(len(row)), key=lambda i: -row[i])
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
    n = len(labels)
    assert got["count"] == n == 18
    assert got["top1"] == top1 / n and got["top5"] == top5 / n
    assert got["loss"] == pytest.approx(loss / n, rel=1e-5)
    assert 0 < top5 < n  # a figure that can be wrong


def test_evaluate_cli(tmp_path, folder, capsys):
    from convmixer_tf.evaluate.__main__ import main

    model = ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    path = str(tmp_path / "m.keras")
    model.save(path)
    out = tmp_path / "metrics.json"
    assert (
        main(["--model", path, "--data-dir", folder, "--json", "--quiet", "--output", str(out)])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == 72 and json.loads(out.read_text())["top1"] == printed["top1"]
    assert main(["--model", str(tmp_path / "none.keras"), "--data-dir", folder, "--quiet"]) == 2
    assert "--model not found" in capsys.readouterr().err


@pytest.mark.slow
def test_train_cli_on_the_jax_backend(tmp_path, tiny_file, folder):
    # The backend for GPU training: tf.data feeds it, Keras' augmentation layers run in tf.data.
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_tf.train",
            "--init",
            tiny_file,
            "--data-dir",
            folder,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--reprob",
            "0.25",
            "--precision",
            "bf16",
            "--output",
            str(tmp_path / "run"),
            "--quiet",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(run.stdout)
    assert metrics["backend"] == "jax" and np.isfinite(metrics["final"]["loss"])


def test_a_run_started_before_a_setting_existed_still_resumes(tmp_path):
    """config.json of an unfinished run written before a TrainConfig field (or an augment
    field) existed: the missing field counts as its default, so the run resumes; a field
    that differs still stops it."""
    from convmixer_tf.train.folder import _existing_run

    settings = TrainConfig(output=str(tmp_path / "run")).settings()
    stored = json.loads(json.dumps(settings))
    del stored["label_smoothing"], stored["augment"]["cutmix"]  # fields added "since"
    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(stored))
    said = []
    assert _existing_run(str(run), settings, said.append) is True
    assert said == [f"resuming the interrupted run in {run}"]
    changed = dict(settings, lr=settings["lr"] * 2)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        _existing_run(str(run), changed, said.append)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a run's settings"):
        _existing_run(str(run), settings, said.append)
