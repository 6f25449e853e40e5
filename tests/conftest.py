import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

TINY = dict(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=10)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def randomize_batchnorm(model, seed=0):
    """Gives every Keras BatchNormalization non-trivial statistics and affine terms.

    Fresh BN (mean 0, var 1, gamma 1, beta 0) is nearly the identity and hides a
    swapped mean/variance; every parity check runs on randomised statistics.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n).astype("float32"),
                    rng.normal(0, 0.2, n).astype("float32"),
                    rng.normal(0, 0.3, n).astype("float32"),
                    rng.uniform(0.5, 2.0, n).astype("float32"),
                ]
            )
    return model


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_folder(root, per_class=24, size=(40, 48), seed=0, classes=COLOURS, names=None):
    """One sub-folder per class; each class a noisy colour (learnable whatever the crop)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, colour in enumerate(classes):
        folder = os.path.join(root, names[c] if names else f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 45, size + (3,)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return str(root)


DIGIT_SIZE = 32
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def tiny_keras(tmp_path_factory):
    """A tiny ConvMixer (8 wide, one block, 3 classes, raw RGB in) saved as model.keras,
    per test module: the input of the command-line tests that need only some model."""
    import convmixer_tf

    path = tmp_path_factory.mktemp("model") / "model.keras"
    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    return str(convmixer_tf.save_model(model, path))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's handwritten digits as raw RGB pixels at DIGIT_SIZE (their 8 x 8 grey
    levels, 0-16, scaled to 0-255 and resized): real images, offline. A seeded split:
    {"train": (images, labels), "calibration": images, "held_out": (images, labels)}."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = data.images[..., None].astype(np.float32) * (255 / 16)
    images = tf.image.resize(grey, (DIGIT_SIZE, DIGIT_SIZE), method="bilinear").numpy()
    images = np.repeat(np.round(np.clip(images, 0, 255)), 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(images))
    train, held_out = order[:1400], order[1400:]
    return {
        "train": (images[train], data.target[train]),
        "calibration": images[train[:64]],
        "held_out": (images[held_out], data.target[held_out]),
    }


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """The one trained model of a test session: a small ConvMixer (raw RGB in, GELU, k7)
    trained on the digits until it tells them apart on images it never saw (real margins
    between classes, unlike random weights: what checks of quantised files need), saved with
    its class names. {"model", "path", "logits" on the held-out digits}, trained once per run
    (`once`)."""
    import convmixer_tf

    path = once(
        tmp_path_factory, "trained", lambda folder: _train_on_digits(digits, folder / "model.keras")
    )
    model = convmixer_tf.load_model(path / "model.keras")
    images, labels = digits["held_out"]
    logits = model.predict(images, verbose=0)
    assert np.mean(logits.argmax(1) == labels) >= 0.95  # it learned the task
    return {"model": model, "path": str(path / "model.keras"), "logits": logits}


@pytest.fixture(scope="session")
def exported(trained, digits, tmp_path_factory):
    """Every file of the session's trained model (the export command's seven, written one
    after the other), calibrated on training digits: the folder that holds them."""

    def export(folder):
        from convmixer_tf import export as exporters

        calibration = write_pngs(folder.parent / "calibration", digits["calibration"])
        options = exporters.ExportOptions(
            formats=("all",), calibration_data=calibration, processes=1
        )
        exporters.export_formats(trained["model"], folder, options)

    return once(tmp_path_factory, "exported", export)


def once(tmp_path_factory, name, make):
    """A folder that `make(folder)` fills once per test run: when the suite runs in several
    worker processes (pytest -n), the first makes it and the others wait for it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / ".done").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".done").write_text("")
    return folder


def run_with_stdio(command, *, stdout="pipe", stderr="pipe", timeout=300, **popen):
    """`command` run with its stdout and its stderr each a pipe, closed (as `>&-` and
    `2>&-` leave them) or, for stdout, /dev/full (every write: ENOSPC): (exit code, what
    the pipes received as text)."""
    import subprocess

    closed = [fd for fd, how in ((1, stdout), (2, stderr)) if how == "closed"]
    given = {"pipe": subprocess.PIPE, "closed": None}
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            command,
            stdout=full if stdout == "full" else given[stdout],
            stderr=given[stderr],
            preexec_fn=lambda: [os.close(fd) for fd in closed],
            timeout=timeout,
            text=True,
            **popen,
        )
    return done.returncode, done.stdout or "", done.stderr or ""


@pytest.fixture
def nested(tmp_path):
    """`nested(depth)`: a folder `depth` levels below tmp_path/deep (a/a/...), made and, after
    the test, removed level by level: os.makedirs and shutil.rmtree recurse, and pytest's
    own clean-up would meet Python's recursion limit."""
    made = []

    def make(depth: int):
        path = str(tmp_path / "deep")
        os.mkdir(path)
        made.append(path)
        for _ in range(depth):
            path = os.path.join(path, "a")
            os.mkdir(path)
            made.append(path)
        return path

    yield make
    import shutil

    for folder in reversed(made):
        for name in set(os.listdir(folder)) - {"a"}:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.rmdir(folder)


def write_pngs(folder, images, names=None):
    """Raw RGB images as PNG files (lossless: the same pixels read back): the folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        name = names[i] if names else f"{i:03d}.png"
        Image.fromarray(np.asarray(image, np.uint8)).save(folder / name)
    return str(folder)


def _train_on_digits(digits, path):
    import keras

    import convmixer_tf

    keras.utils.set_random_seed(0)
    model = convmixer_tf.ConvMixer(
        dim=32,
        depth=3,
        kernel_size=7,
        patch_size=2,
        num_classes=10,
        input_shape=(DIGIT_SIZE, DIGIT_SIZE, 3),
        include_preprocessing=True,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(True),
    )
    model.fit(*digits["train"], batch_size=64, epochs=6, verbose=0)
    from convmixer_tf.facts import attach

    facts = convmixer_tf.facts_of(model).replace(class_names=DIGIT_NAMES)
    convmixer_tf.save_model(attach(model, facts), path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """The project's wheel, as a user builds it after `npm ci`: `pip wheel . --no-deps` of
    this checkout's files (git's tracked and untracked ones, none it ignores, copied to a
    clean folder, with node_modules/ linked), once per test run. Its path."""
    import shutil
    import subprocess

    def build(folder):
        source = folder / "source"
        listed = (
            subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=REPO,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, listed):
            if os.path.isfile(os.path.join(REPO, name)):  # not a file deleted meanwhile
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(os.path.join(REPO, name), source / name)
        (source / "node_modules").symlink_to(os.path.join(REPO, "node_modules"))
        command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q"]
        done = subprocess.run([*command, "-w", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    (path,) = once(tmp_path_factory, "wheel", build).glob("*.whl")
    return path


def fresh_venv(folder, requirement):
    """A new virtual environment in `folder` (no system site packages) with `requirement`
    (a wheel, with its extras: "path.whl[web]") installed from the configured package
    index, at the versions of requirements/constraints.txt, as CI installs: its bin/."""
    import subprocess

    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    constraints = os.path.join(REPO, "requirements", "constraints.txt")
    command = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "-c", constraints]
    # Outside the checkout: pip would take its convmixer_tf.egg-info for an installed copy.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [*command, requirement], capture_output=True, text=True, cwd=folder, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return folder / "bin"
