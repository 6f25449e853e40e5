"""Pretrained weights from the Hugging Face Hub's cache, offline: a cache written here in
huggingface_hub's own layout (blobs, refs, snapshots), which timm itself reads, then our
converter, create_model(pretrained=...) and hf:// loading on the same cache."""

import contextlib
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch_helpers import timm_convmixer, torch

import convmixer_tf
from convmixer_tf import saving
from convmixer_tf.export import registry
from convmixer_tf.facts import attach, facts_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITS = ("1" * 40, "2" * 40)


def hub_cache(root, repo, files, commit=COMMITS[0], ref="main"):
    """Writes `files` ({name: bytes}) as `commit` of `repo` into a Hugging Face cache at
    `root`, the way huggingface_hub does, and points `ref` at it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return root


def safetensors_bytes(module):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in module.state_dict().items()})


def offline_env(cache):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=REPO)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """This process reading `tmp_path / "hub"` offline (huggingface_hub reads its settings at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "hub"


TIMM_CONFIG = {  # timm's config.json for its ConvMixer repos, with a crop and names of its own
    "architecture": "convmixer_768_32",
    "num_classes": 1000,
    "num_features": 768,
    "label_names": [f"label {i}" for i in range(1000)],
    "pretrained_cfg": {
        "tag": "in1k",
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.2, 0.3],
        "num_classes": 1000,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
    },
}


@pytest.mark.slow
def test_timm_reads_the_cache_and_the_converter_matches_it(tmp_path):
    import timm

    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(
        timm.create_model("convmixer_768_32", pretrained=False), seed=4
    ).eval()
    cache = hub_cache(
        tmp_path / "hub",
        "timm/convmixer_768_32.in1k",
        {
            "model.safetensors": safetensors_bytes(net),
            "config.json": json.dumps(TIMM_CONFIG).encode(),
        },
    )
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, timm, torch\n"
        "m = timm.create_model('hf-hub:timm/convmixer_768_32.in1k', pretrained=True).eval()\n"
        "x = torch.from_numpy(np.load(sys.argv[1]).transpose(0, 3, 1, 2).copy())\n"
        "np.save(sys.argv[2], m(x).detach().numpy())\n"
        "print(m.pretrained_cfg['crop_pct'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "timm.npy")],
        env=offline_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    # timm read this cache
    assert run.returncode == 0 and run.stdout.strip() == "0.9", run.stderr[-3000:]
    out = tmp_path / "converted"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "weights_converter",
            "--torch-ckpt",
            "hf-hub:timm/convmixer_768_32.in1k",
            "--output",
            str(out),
            "--json",
            "--quiet",
        ],
        env=offline_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert (
        report["parity"]["passed"] and report["conversion"]["matched_variant"] == "convmixer_768_32"
    )
    model = convmixer_tf.load_model(out / "model.keras")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np.load(tmp_path / "timm.npy"), atol=1e-4
    )
    info = convmixer_tf.facts_of(model)
    cfg = TIMM_CONFIG["pretrained_cfg"]
    assert (info.preprocessing.crop_pct, info.preprocessing.mean, info.preprocessing.std) == (
        cfg["crop_pct"],
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
    )
    assert info.class_names == tuple(TIMM_CONFIG["label_names"]) and info.source["license"] == "mit"
    card = (out / "README.md").read_text()
    assert "base_model: timm/convmixer_768_32.in1k" in card and "license: mit" in card


def tiny(seed):
    """A ConvMixer of convmixer_256_8's shape (the paper's CIFAR-10 model), random weights."""
    return timm_convmixer(seed=seed, dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10)


def test_a_pinned_revision_a_missing_id_and_a_repo_without_weights(offline, tmp_path, capsys):
    from weights_converter.__main__ import main

    # main: the first (written last); the other pinned
    for commit, seed in reversed(list(zip(COMMITS, (1, 2)))):
        weights = {"pytorch_model.bin": _torch_bytes(tiny(seed))}
        hub_cache(offline, "someone/cifar-convmixer", weights, commit=commit)
    hub_cache(offline, "someone/notes", {"README.md": b"no weights here"})

    def convert(ckpt, out):
        code = main(["--torch-ckpt", ckpt, "--output", str(out), "--json", "--quiet"])
        return code, capsys.readouterr().err

    code, err = convert(f"hf-hub:someone/cifar-convmixer@{COMMITS[1]}", tmp_path / "pinned")
    assert code == 0, err[-3000:]
    pinned = convmixer_tf.load_model(tmp_path / "pinned" / "model.keras")
    source = convmixer_tf.facts_of(pinned).source
    assert source["commit"] == COMMITS[1] and source["repo"] == "someone/cifar-convmixer"
    weights = pinned.get_layer("stem_conv").get_weights()[0]
    assert np.allclose(weights, tiny(2).stem[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    for ckpt, words in (
        ("hf-hub:nobody/missing", "is not in the Hugging Face cache"),
        ("hf-hub:someone/notes", "holds no ConvMixer weights"),
    ):
        before = sorted(os.listdir(tmp_path))
        code, err = convert(ckpt, tmp_path / "out")
        assert code == 2 and err.startswith("error: ") and words in err, err
        assert len(err.strip().splitlines()) == 1 and sorted(os.listdir(tmp_path)) == before
    assert "hf download nobody/missing" in convert("hf-hub:nobody/missing", tmp_path / "out")[1]


def _torch_bytes(module):
    import io

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def test_pretrained_converts_once_and_a_copy_fetches_nothing(offline, monkeypatch):
    import keras

    from weights_converter import convert, hub

    hub_cache(offline, "someone/cifar-convmixer", {"model.safetensors": safetensors_bytes(tiny(3))})
    conversions = []
    real = convert.convert_state_dict
    monkeypatch.setattr(
        convert, "convert_state_dict", lambda *a, **k: conversions.append(1) or real(*a, **k)
    )
    first = convmixer_tf.create_model(
        "convmixer_256_8", pretrained="hf-hub:someone/cifar-convmixer"
    )
    second = convmixer_tf.create_model(
        "convmixer_256_8", pretrained="hf-hub:someone/cifar-convmixer"
    )
    assert len(conversions) == 1 and os.listdir(os.environ["KERAS_HOME"] + "/models/convmixer_tf")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(first.predict(x, verbose=0), second.predict(x, verbose=0))
    # the weights must be the named variant's
    with pytest.raises(ValueError, match="convmixer_768_32"):
        convmixer_tf.create_model("convmixer_768_32", pretrained="hf-hub:someone/cifar-convmixer")
    monkeypatch.setattr(hub, "resolve", lambda *a: pytest.fail("a copy fetched weights"))
    copy = keras.Model.from_config(second.get_config())
    copy.set_weights(second.get_weights())
    tuned = convmixer_tf.rebuild(second, num_classes=3)
    assert tuned.output_shape == (None, 3) and copy.output_shape == second.output_shape


def test_hf_layout_keeps_the_models_facts(offline, tmp_path):
    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
        mean=(0.1, 0.2, 0.3),
    )
    facts = facts_of(model).replace(class_names=("cat", "dog", "eel"))
    folder = saving.write_hub_folder(attach(model, facts), tmp_path / "keras_layout")
    written = set(os.listdir(folder))
    assert {
        "config.json",
        "model.weights.h5",
        "metadata.json",
        "convmixer.json",
        "README.md",
    } <= written
    hub_cache(
        offline,
        "someone/pets",
        {
            name: (folder / name).read_bytes()
            for name in os.listdir(folder)
            if (folder / name).is_file()
        },
    )
    loaded = convmixer_tf.load_model("hf://someone/pets")
    assert convmixer_tf.facts_of(loaded) == facts
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_cache_entry_that_is_not_what_its_name_promises_is_converted_again(offline):
    """The cache is ours: another model's valid .keras, or a truncated file, where a converted
    model's name points is converted again and replaced; a killed conversion's temporary
    file is removed by the next call, a live writer's kept."""
    from weights_converter.pretrained import cache_folder

    hub_cache(offline, "someone/cifar-convmixer", {"model.safetensors": safetensors_bytes(tiny(3))})
    model = convmixer_tf.create_model(
        "convmixer_256_8", pretrained="hf-hub:someone/cifar-convmixer"
    )
    (cached,) = [os.path.join(cache_folder(), name) for name in os.listdir(cache_folder())]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    other = convmixer_tf.ConvMixer(
        dim=64,
        depth=2,
        kernel_size=5,
        patch_size=2,
        num_classes=10,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    for entry in ("another model", "truncated"):
        if entry == "another model":
            convmixer_tf.save_model(other, cached)
        else:
            with open(cached, "r+b") as f:
                f.truncate(2000)
        again = convmixer_tf.create_model(
            "convmixer_256_8", pretrained="hf-hub:someone/cifar-convmixer"
        )
        assert convmixer_tf.facts_of(again).config.dim == 256, entry
        np.testing.assert_allclose(again.predict(x, verbose=0), expected, atol=1e-6, err_msg=entry)
        # replaced
        assert convmixer_tf.facts_of(convmixer_tf.load_model(cached)).config.dim == 256, entry
    dead, live = _temporaries(cached)
    os.remove(cached)
    convmixer_tf.create_model("convmixer_256_8", pretrained="hf-hub:someone/cifar-convmixer")
    assert not os.path.exists(dead) and os.path.exists(live)


def _temporaries(cached):
    """A temporary file of a conversion that was killed (kill -9 while saving), and one of a
    live writer (this process), beside the cache entry."""
    script = (
        "import os, sys\nfrom convmixer_tf import temporaries\n"
        "path = temporaries.temporary_name(sys.argv[1], suffix='.keras')\n"
        "open(path, 'w').write('half a model')\nprint(path, flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, cached],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    dead = done.stdout.strip()
    assert done.returncode == -9 and os.path.exists(dead), done.stderr[-2000:]
    from convmixer_tf import temporaries

    live = temporaries.temporary_name(cached, suffix=".keras")
    with open(live, "w") as f:
        f.write("being written")
    return dead, live


def test_load_model_of_a_repo_of_pytorch_weights_says_what_to_do(offline):
    hub_cache(
        offline,
        "timm/convmixer_768_32.in1k",
        {
            "model.safetensors": safetensors_bytes(tiny(1)),
            "config.json": json.dumps(TIMM_CONFIG).encode(),
        },
    )
    with pytest.raises(
        ValueError, match=r"holds PyTorch weights \(model.safetensors\), not a Keras model"
    ) as err:
        convmixer_tf.load_model("hf://timm/convmixer_768_32.in1k")
    assert 'pretrained="hf-hub:timm/convmixer_768_32.in1k"' in str(err.value)
    assert "weights_converter --torch-ckpt hf-hub:timm/convmixer_768_32.in1k" in str(err.value)


def test_export_of_a_hub_model_writes_a_local_folder_by_default(
    offline, tmp_path, monkeypatch, capsys
):
    from convmixer_tf.export.__main__ import main

    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    folder = saving.write_hub_folder(model, tmp_path / "layout")
    hub_cache(
        offline,
        "someone/pets",
        {
            name: (folder / name).read_bytes()
            for name in os.listdir(folder)
            if (folder / name).is_file()
        },
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert (
        main(["--model", "hf://someone/pets", "--formats", "onnx", "--processes", "1", "--quiet"])
        == 0
    )
    assert os.listdir(work) == ["pets_export"] and (work / "pets_export" / "model.onnx").is_file()


HOSTILE_CONFIGS = {  # config.json bytes that no reader may choke on: exit 2, one line
    "nested 200,000 deep": (b"[" * 200_000 + b"]" * 200_000, "cannot be read as JSON"),
    "an object nested deep": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "cannot be read as JSON"),
    "larger than 16 MiB": (b'{"pad": "' + b" " * (1 << 24) + b'"}', "holds more than"),
    "not UTF-8": (b'{"label_names": ["\xff"]}', "cannot be read as JSON"),
    "a field nested deep": (
        json.dumps({"pretrained_cfg": {"mean": [[[[[[[[1]]]]]]]] * 3, "std": [1, 1, 1]}}).encode(),
        "mean must be 3 finite numbers",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_CONFIGS))
def test_a_hostile_config_json_is_exit_2_in_one_line(offline, tmp_path, capsys, name):
    from weights_converter.__main__ import main

    data, words = HOSTILE_CONFIGS[name]
    files = {"model.safetensors": safetensors_bytes(tiny(1)), "config.json": data}
    hub_cache(offline, "someone/cifar-convmixer", files)
    out = tmp_path / "out"
    code = main(["--torch-ckpt", "hf-hub:someone/cifar-convmixer", "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, (name, err[-2000:])
    assert err.isprintable() and len(err) < 2000 and not out.exists(), (name, err[:2000])


# ------------------------------------------------------------------ no network


@contextlib.contextmanager
def _unreachable_endpoint(kind):
    """An HF_ENDPOINT that gives no answer: a port nothing listens on ("closed"), or one
    that takes the connection and never says a word ("silent")."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if kind == "closed":
        server.close()
    else:
        server.listen(16)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


RESOLVE = (
    "import sys, time\n"
    "from convmixer_tf.errors import BadInput\n"
    "from weights_converter import hub\n"
    "start = time.perf_counter()\n"
    "try:\n"
    "    print(hub.resolve(sys.argv[1]).path)\n"
    "except BadInput as err:\n"
    "    print('error:', err, file=sys.stderr)\n"
    "print(f'{time.perf_counter() - start:.2f}')\n"
)


def _resolve_without_network(name, cache, endpoint):
    """hub.resolve(name) in a fresh process (huggingface_hub reads its settings at
    import), online in its settings but with `endpoint` unreachable: (stdout lines, stderr,
    seconds resolve took)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint, PYTHONPATH=REPO)
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE, name], env=env, capture_output=True, text=True, timeout=120
    )
    lines = run.stdout.splitlines()
    return lines[:-1], run.stderr.strip(), float(lines[-1])


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_without_network_the_hub_fails_fast_in_one_line_and_the_cache_still_serves(tmp_path, kind):
    """No network and no HF_HUB_OFFLINE: a name the cache lacks is one quiet line within
    seconds (huggingface_hub alone retries for most of a minute), naming the repo and the
    unreachable Hub; a name the cache holds is read from it, without waiting on the Hub."""
    cache = hub_cache(tmp_path / "hub", "someone/cached", {"model.safetensors": b"weights"})
    with _unreachable_endpoint(kind) as endpoint:
        out, err, seconds = _resolve_without_network("hf-hub:nobody/missing", cache, endpoint)
        assert out == [] and seconds < 8, (seconds, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: nobody/missing "), err
        assert "cannot be reached" in err and endpoint in err, err
        out, err, seconds = _resolve_without_network("hf-hub:someone/cached", cache, endpoint)
        assert len(out) == 1 and out[0].endswith("model.safetensors"), (out, err[-2000:])
        assert err == "" and seconds < 2, (seconds, err[-2000:])


@pytest.mark.parametrize(
    "endpoint", ["http://[bad", "http://127.0.0.1:99999", "ftp://x", "", "http://127.0.0.1:9/x y"]
)
def test_an_hf_endpoint_that_is_no_url_is_one_line(tmp_path, endpoint):
    """HF_ENDPOINT as a user may mistype it: BadInput in one line, as without a network
    (huggingface_hub itself refuses some of these as it is imported)."""
    out, err, seconds = _resolve_without_network("hf-hub:nobody/missing", tmp_path, endpoint)
    assert out == [] and seconds < 8 and len(err.splitlines()) == 1, (seconds, err[-2000:])
    assert err.startswith("error: ") and ("HF_ENDPOINT" in err or "cannot be reached" in err), err


@settings(max_examples=300, deadline=200)
@given(st.one_of(st.text(), st.from_regex(r"https?://[^/]*(:\d*)?(/.*)?", fullmatch=True)))
@example("HTTP:// ")  # urllib strips the space, and with it the host
def test_any_hf_endpoint_is_a_url_or_a_value_error(endpoint):
    """The reader of HF_ENDPOINT: any text is an http(s) URL it can ask, or a ValueError
    that the probe turns into the one line, never another exception."""
    from weights_converter.hub import _check_url

    try:
        _check_url(endpoint)
    except ValueError:
        return
    request = urllib.request.Request(endpoint, method="HEAD")
    assert request.host


def test_without_network_the_demo_says_offline_within_seconds(tmp_path):
    """`make demo` on a machine without a network: its first line, the offline one, comes
    within seconds (it then converts seeded weights, which this test does not wait for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=REPO)
    with _unreachable_endpoint("silent") as endpoint:
        env["HF_ENDPOINT"] = endpoint
        command = [sys.executable, "-m", "weights_converter.demo", "--output", str(tmp_path)]
        start = time.perf_counter()
        demo = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([demo.stdout], [], [], 60)
            seconds = time.perf_counter() - start
            first = demo.stdout.readline().decode() if ready else ""
        finally:
            demo.kill()
            demo.communicate()
    assert first == "offline: random weights; the answers below mean nothing\n", first
    assert seconds < 8, seconds


# ------------------------------------------------------------------ make demo


def test_the_demo_takes_the_released_weights_where_the_cache_has_them(offline, tmp_path):
    """Which weights `make demo` converts: the Hub id where the Hub or its cache holds it
    (here a cache; nothing is downloaded), else seeded ones, saying so in one line."""
    from weights_converter import demo

    said = []
    written = []
    real = demo.write_demo_checkpoint
    demo.write_demo_checkpoint = lambda path: written.append(path) or path
    try:
        assert demo.released_or_seeded(str(tmp_path / "demo"), said.append) != demo.RELEASED
        assert said == [demo.OFFLINE] and written == [
            str(tmp_path / "demo" / "convmixer_768_32.pth")
        ]
        hub_cache(offline, "timm/convmixer_768_32.in1k", {"model.safetensors": b"weights"})
        said.clear()
        assert demo.released_or_seeded(str(tmp_path / "demo"), said.append) == demo.RELEASED
        assert said[0].startswith("the released weights: hf-hub:timm/convmixer_768_32.in1k")
        assert len(written) == 1
    finally:
        demo.write_demo_checkpoint = real


def test_the_demo_prints_an_odd_folder_escaped(tmp_path, monkeypatch, capsys):
    """Every line the demo prints with a name in it (the commands it runs, the ones it
    suggests) shows the name as `ls -b` does: a newline or an escape sequence in --output
    forges no line and reaches no terminal."""
    from convmixer_tf.cli import escaped
    from weights_converter import demo

    monkeypatch.setattr(demo, "PHOTO", str(tmp_path / "absent.jpg"))
    out = tmp_path / os.fsdecode(b"d\xff\n\x1b[31m")
    out.mkdir()
    (out / "model_int8.tflite").write_bytes(b"")
    assert demo._run([sys.executable, "-c", "pass", str(out)]) == 0
    assert demo._try_it(str(out)) == 0
    printed = capsys.readouterr().out
    assert printed.count(escaped(str(out))) == 3, printed
    assert all(line.isprintable() for line in printed.splitlines()), printed


def _run_demo(env, out, *more):
    return subprocess.run(
        [sys.executable, "-m", "weights_converter.demo", "--output", str(out), *more],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def _photo_line(stdout):
    """The photo's result in predict's table: its path, then its top classes."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("chelsea.jpg") and "$" not in line)
    assert lines[at] == os.path.join("docs", "photos", "chelsea.jpg"), lines[at]
    assert re.fullmatch(r" +\d+\.\d\d%  \S.*", lines[at + 1]), lines[at + 1]
    return lines[at + 1]


@pytest.mark.slow
def test_make_demo_converts_the_released_weights_from_the_cache(tmp_path):
    """What `make demo` runs, offline, on a Hugging Face cache holding convmixer_768_32 in
    timm's layout. The weights are random (nothing is downloaded here): this proves the
    path, not the accuracy."""
    import timm

    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(timm.create_model("convmixer_768_32", pretrained=False), seed=5)
    files = {"model.safetensors": safetensors_bytes(net), "config.json": json.dumps(TIMM_CONFIG)}
    cache = hub_cache(
        tmp_path / "hub",
        "timm/convmixer_768_32.in1k",
        {name: data if isinstance(data, bytes) else data.encode() for name, data in files.items()},
    )
    del net
    env = dict(offline_env(cache), KERAS_HOME=str(tmp_path / "keras"))
    run = _run_demo(env, tmp_path / "demo")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "offline:" not in run.stdout
    assert "the released weights: hf-hub:timm/convmixer_768_32.in1k" in run.stdout
    assert "--torch-ckpt hf-hub:timm/convmixer_768_32.in1k" in run.stdout
    assert "parity PASSED" in run.stderr
    assert re.search(r"  label \d+$", _photo_line(run.stdout))  # the config's class names
    written = sorted(os.listdir(tmp_path / "demo" / "convmixer_768_32_keras"))
    exported = [f.filename for f in registry.FORMATS]
    assert written == sorted(exported + ["README.md", "RECORD", "model.keras", "report.json"])


@pytest.mark.slow
def test_make_demo_offline_says_its_answers_mean_nothing(tmp_path):
    """The fallback, with one export instead of all: a seeded checkpoint, the line that says
    so, and the photo classified all the same."""
    env = dict(offline_env(tmp_path / "hub"), KERAS_HOME=str(tmp_path / "keras"))
    run = _run_demo(env, tmp_path / "demo", "--export", "onnx")
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert run.stdout.splitlines()[0] == "offline: random weights; the answers below mean nothing"
    _photo_line(run.stdout)
