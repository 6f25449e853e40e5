import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from torch_helpers import (
    TINY,
    WITHOUT_TORCH,
    directory_entries,
    keras_input_to_torch,
    labml_convmixer,
    one_liner_convmixer,
    save_checkpoint,
    sequential_convmixer,
    timm_convmixer,
    torch,
)

from weights_converter import (
    CheckpointError,
    convert_checkpoint,
    infer_config,
    keras_to_state_dict,
    load_state_dict,
)
from weights_converter.__main__ import main
from weights_converter.pipeline import ConvertOptions, convert_and_verify, default_output_dir

# name: (PyTorch network, the layout the converter reads it as, depthwise or a full conv)
LAYOUTS = {
    "timm": (lambda: timm_convmixer(), "timm", True),
    "sequential": (lambda: sequential_convmixer(), "sequential", True),
    "sequential_full_conv": (lambda: sequential_convmixer(depthwise=False), "sequential", False),
    "one_liner": (lambda: one_liner_convmixer(), "one_liner", False),
    "one_liner_depthwise": (lambda: one_liner_convmixer(depthwise=True), "one_liner", True),
    "labml": (lambda: labml_convmixer(), "labml", True),
}
WRAPPERS = [None, "state_dict", "state_dict_ema", "model", "module_prefix"]
TORCH_FORMATS = [".pth", ".pth.tar", ".pt", ".bin"]


def _keras_logits(model, x):
    return np.asarray(model(x, training=False))


# Every combination runs in the slow set; the fast set runs six, among which every layout,
# every wrapper and every file format appears.
COVERING = {
    ("timm", None, ".pth"),
    ("sequential", "state_dict", ".pth.tar"),
    ("sequential_full_conv", "state_dict_ema", ".pt"),
    ("one_liner", "model", ".bin"),
    ("one_liner_depthwise", "module_prefix", ".pth"),
    ("labml", "state_dict", ".pth"),
}
COMBINATIONS = [
    pytest.param(*case, marks=() if case in COVERING else pytest.mark.slow)
    for case in itertools.product(LAYOUTS, WRAPPERS, TORCH_FORMATS)
]


@pytest.mark.parametrize("layout,wrapper,suffix", COMBINATIONS)
def test_every_layout_wrapper_and_torch_format(tmp_path, layout, wrapper, suffix):
    build, read_as, depthwise = LAYOUTS[layout]
    net = build()
    prefix = "module." if wrapper == "module_prefix" else ""
    path = save_checkpoint(
        net.state_dict(),
        tmp_path / f"ckpt{suffix}",
        wrapper=None if wrapper == "module_prefix" else wrapper,
        prefix=prefix,
        legacy=(suffix == ".bin"),
    )
    report = convert_and_verify(ConvertOptions(path, use_ema=(wrapper == "state_dict_ema")))
    assert report.passed, report.parity
    assert report.parity.max_abs <= 1e-4
    assert report.conversion["layout"] == read_as
    assert report.conversion["config"]["depthwise"] == depthwise
    out = default_output_dir(path)
    assert directory_entries(out) == ["README.md", "RECORD", "model.keras", "report.json"]
    # The converted file, on its own, computes what the PyTorch network computes.
    import keras

    model = keras.models.load_model(os.path.join(out, "model.keras"))
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    with torch.no_grad():
        ref = net(keras_input_to_torch(x)).numpy()
    np.testing.assert_allclose(_keras_logits(model, x), ref, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors(tmp_path, layout, prefix):
    net = LAYOUTS[layout][0]()
    path = save_checkpoint(net.state_dict(), tmp_path / "w.safetensors", prefix=prefix)
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed
    assert report.conversion["checkpoint"]["file_format"] == "safetensors"


def test_bfloat16_safetensors_convert(tmp_path):
    """numpy has no bfloat16: such a file is read through torch where torch is installed."""
    net = timm_convmixer()
    weights = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net.state_dict().items()
    }
    path = save_checkpoint(weights, tmp_path / "w.safetensors")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed, report.parity
    assert report.conversion["checkpoint"]["dtypes"] == ["torch.bfloat16", "torch.int64"]


def test_the_report_is_one_record_with_a_passed_flag(tmp_path, capsys):
    """convert_and_verify returns a Report; report.json and --json hold its to_dict(), with
    the keys they always held; the PyTorch tensors are released once parity is proven."""
    from weights_converter import convert

    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    released = []
    real = convert.Conversion.release
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert.Conversion, "release", lambda c: released.append(1) or real(c))
        report = convert_and_verify(ConvertOptions(path, output=str(tmp_path / "a")))
    assert report.passed is True and report.parity.passed and released == [1]
    written = json.loads((tmp_path / "a" / "report.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert list(written) == ["status", "output", "timings_s", "conversion", "parity", "files"]
    # counted before the tensors were released
    assert written["conversion"]["checkpoint"]["tensors"] == len(timm_convmixer().state_dict())
    assert written["status"] == "ok" and [row["path"] for row in report.files] == ["model.keras"]
    assert list(report.timings_s) == ["convert", "parity", "save"]
    skipped = convert_and_verify(ConvertOptions(path, output=str(tmp_path / "b"), skip_parity=True))
    assert skipped.passed and skipped.parity is None
    assert skipped.to_dict()["parity"] == {"skipped": True}
    code = main(["--torch-ckpt", str(path), "--output", str(tmp_path / "a"), "--force", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["replaced"] == "existing output"
    assert printed == json.loads((tmp_path / "a" / "report.json").read_text())


def test_full_conv_uses_keras_conv2d(tmp_path):
    import keras

    path = save_checkpoint(sequential_convmixer(depthwise=False).state_dict(), tmp_path / "c.pth")
    model = convert_checkpoint(path)
    assert type(model.get_layer("block0_dw_conv")) is keras.layers.Conv2D


def test_ema_weights_are_the_ones_taken(tmp_path):
    net = timm_convmixer()
    path = save_checkpoint(net.state_dict(), tmp_path / "train.pth.tar", wrapper="state_dict_ema")
    ema = load_state_dict(path, use_ema=True)
    live = load_state_dict(path)
    np.testing.assert_array_equal(ema["stem.0.weight"], net.state_dict()["stem.0.weight"].numpy())
    np.testing.assert_array_equal(
        live["stem.0.weight"], net.state_dict()["stem.0.weight"].numpy() + 1.0
    )
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_state_dict(save_checkpoint(net.state_dict(), tmp_path / "plain.pth"), use_ema=True)


def test_timm_training_checkpoint_with_argparse_namespace(tmp_path):
    import argparse

    net = timm_convmixer()
    torch.save(
        {
            "state_dict": net.state_dict(),
            "args": argparse.Namespace(model="convmixer", lr=0.01),
            "epoch": 10,
        },
        tmp_path / "last.pth.tar",
    )
    report = convert_and_verify(ConvertOptions(tmp_path / "last.pth.tar"))
    assert report.passed
    assert report.conversion["checkpoint"]["other_keys"] == ["args", "epoch"]


def test_headless_checkpoint_converts_to_feature_extractor(tmp_path):
    net = timm_convmixer()
    net.reset_classifier(0)
    path = save_checkpoint(net.state_dict(), tmp_path / "features.pth")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed and report.conversion["include_top"] is False


def test_infer_config_and_variant_match():
    import timm

    sd = {k: v.numpy() for k, v in timm.create_model("convmixer_768_32").state_dict().items()}
    cfg = infer_config(sd)
    assert (
        cfg.dim,
        cfg.depth,
        cfg.kernel_size,
        cfg.patch_size,
        cfg.activation,
        cfg.num_classes,
    ) == (768, 32, 7, 7, "relu", 1000)
    assert infer_config(sd, activation="gelu").activation == "gelu"
    tiny = infer_config(
        {k: v.numpy() for k, v in timm_convmixer(kernel_size=8).state_dict().items()}
    )
    assert (tiny.kernel_size, tiny.activation, tiny.depthwise) == (8, "gelu", True)


def test_even_kernel_same_padding_matches(tmp_path):
    net = timm_convmixer(kernel_size=8, patch_size=3)
    path = save_checkpoint(net.state_dict(), tmp_path / "even.pth")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed, report.parity


# The PyTorch networks each layout's state dict loads into, strictly.
TARGETS = {
    "timm": lambda seed: timm_convmixer(seed=seed),
    "sequential": lambda seed: sequential_convmixer(seed=seed),
    "one_liner": lambda seed: one_liner_convmixer(depthwise=True, seed=seed),
    "labml": lambda seed: labml_convmixer(seed=seed),
}


@pytest.mark.parametrize("layout", list(TARGETS))
def test_round_trip_keras_to_pytorch_strict(tmp_path, layout):
    net = timm_convmixer()
    model = convert_checkpoint(save_checkpoint(net.state_dict(), tmp_path / "a.pth"))
    # "Fine-tune" in Keras: change every weight so the round trip cannot pass by accident.
    rng = np.random.default_rng(7)
    for w in model.weights:
        w.assign(np.asarray(w) + rng.normal(0, 0.01, w.shape).astype("float32"))
    sd = keras_to_state_dict(model, layout=layout, framework="torch")
    target = TARGETS[layout](seed=1)
    target.load_state_dict(sd, strict=True)
    x = np.random.default_rng(8).normal(size=(2, 32, 32, 3)).astype("float32")
    with torch.no_grad():
        ref = target.eval()(keras_input_to_torch(x)).numpy()
    np.testing.assert_allclose(ref, _keras_logits(model, x), atol=1e-4)
    assert not np.allclose(ref, net(keras_input_to_torch(x)).detach().numpy(), atol=1e-3)
    # and the way in: the layout's own keys convert to the same model
    again = convert_checkpoint(save_checkpoint(target.state_dict(), tmp_path / "b.pth"))
    np.testing.assert_allclose(_keras_logits(again, x), _keras_logits(model, x), atol=1e-5)


# labml's CIFAR-10 experiment (d_model 256, 8 layers, kernel 9, patch 2, 10 classes, 32 px),
# and a 224 px model of the ImageNet kind.
LABML_SHAPES = {
    "cifar10": (dict(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10), 32),
    "224px": (dict(dim=64, depth=4, kernel_size=9, patch_size=7, num_classes=1000), 224),
}


@pytest.mark.parametrize("shape", list(LABML_SHAPES))
def test_labml_checkpoints_convert_with_parity_at_every_stage(tmp_path, shape):
    from weights_converter import check_parity

    overrides, size = LABML_SHAPES[shape]
    net = labml_convmixer(seed=2, **overrides)
    path = save_checkpoint(net.state_dict(), tmp_path / "model.pth")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed and report.conversion["layout"] == "labml"
    model = convert_checkpoint(path)
    x = np.random.default_rng(3).normal(size=(2, size, size, 3)).astype("float32")
    # labml's own module, its stages hooked where labml names them
    parity = check_parity(net, model, x, tolerance=1e-5)
    assert parity.passed and parity.max_abs <= 1e-5, parity.describe()
    assert [s.name for s in parity.stages] == (
        ["stem"] + [f"block{i}" for i in range(overrides["depth"])] + ["output"]
    )
    assert not any(stage.diverged for stage in parity.stages), parity.stages


def test_a_headless_labml_checkpoint_converts_as_a_feature_model(tmp_path):
    net = labml_convmixer()
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("classification.")}
    path = save_checkpoint(weights, tmp_path / "features.pth")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed and report.conversion["include_top"] is False
    model = convert_checkpoint(path)
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype("float32")
    with torch.no_grad():
        pooled = net.features(keras_input_to_torch(x)).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(_keras_logits(model, x), pooled, atol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True], ids=["tweet", "released"])
def test_the_papers_one_liner_converts_in_both_forms(tmp_path, depthwise):
    """The 280-character listing, as printed (no groups=dim) and as released (groups=dim)."""
    from weights_converter import check_parity

    net = one_liner_convmixer(activation="gelu", depthwise=depthwise)
    assert "0.0.weight" in net.state_dict() and "1.0.0.0.weight" in net.state_dict()
    path = save_checkpoint(net.state_dict(), tmp_path / "tweet.pth")
    report = convert_and_verify(ConvertOptions(path))
    assert report.passed, report.parity
    assert report.conversion["layout"] == "one_liner"
    assert report.conversion["config"]["depthwise"] == depthwise
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    parity = check_parity(net, convert_checkpoint(path), x, tolerance=1e-5)
    assert parity.passed and len(parity.stages) == TINY["depth"] + 2, parity.describe()


def test_check_parity_takes_batches_of_several_sizes_and_refuses_none(tmp_path):
    """The API parity's images go through: a list of batches of different sizes, judged as
    one (a wrong weight at one size is found), and no image at all is a one-line refusal."""
    from convmixer_tf.errors import BadInput
    from weights_converter import check_parity

    net = timm_convmixer()
    model = convert_checkpoint(save_checkpoint(net.state_dict(), tmp_path / "m.pth"))
    rng = np.random.default_rng(1)
    batches = [
        rng.normal(size=(n, side, side, 3)).astype("float32") for n, side in ((2, 32), (1, 48))
    ]
    parity = check_parity(net, model, batches, tolerance=1e-5)
    assert parity.passed and parity.num_inputs == 3, parity.describe()
    model.get_layer("block1_pw_bn").moving_mean.assign(
        model.get_layer("block1_pw_bn").moving_mean + 1
    )
    parity = check_parity(net, model, batches, tolerance=1e-5)
    assert not parity.passed and parity.first_divergent_stage == "block1", parity.describe()
    with pytest.raises(BadInput, match="at least one image"):
        check_parity(net, model, np.zeros((0, 32, 32, 3), "float32"))


@pytest.mark.parametrize("layout", list(TARGETS))
def test_errors_name_the_files_own_keys(tmp_path, capsys, layout):
    """A missing or mis-shaped tensor is named as the file names it, never by the canonical
    (timm) name the file never had."""
    weights = TARGETS[layout](seed=0).state_dict()
    canonical_pw = {"timm": "blocks.1.1", "sequential": "4.1", "one_liner": "2.1.0"}
    pointwise = canonical_pw.get(layout, "conv_mixer_layers.1.point_wise_conv") + ".weight"
    missing = {k: v for k, v in weights.items() if k != pointwise}
    shaped = dict(weights, **{pointwise: torch.zeros(16, 16, 3, 3)})
    for name, tensors, words in (
        ("missing", missing, f"missing key {pointwise!r}"),
        ("shape", shaped, f"wrong shape for {pointwise!r}"),
    ):
        path = save_checkpoint(tensors, tmp_path / f"{name}.pth")
        assert main(["--torch-ckpt", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert layout == "timm" or "blocks." not in err, err


def test_keys_of_no_layout_name_the_layouts_tried(tmp_path, capsys):
    import torchvision

    path = save_checkpoint(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    assert main(["--torch-ckpt", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    for tried in ("timm", "sequential", "one_liner", "labml"):
        assert tried in err, err
    assert "'conv1.weight'" in err and "stem." not in err, err


@pytest.mark.slow
def test_activation_mismatch_fails_parity_and_names_the_block(tmp_path, capsys):
    import timm

    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(timm.create_model("convmixer_768_32")).eval()
    path = save_checkpoint(net.state_dict(), tmp_path / "cm768.pth")
    code = main(["--torch-ckpt", str(path), "--activation", "gelu", "--quiet"])
    assert code == 1
    out = default_output_dir(path)
    assert directory_entries(out) == ["RECORD", "report.json"]  # no model from a failed proof
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["status"] == "parity_failed"
    assert report["parity"]["first_divergent_stage"] == "stem"
    assert "first diverging stage: stem" in capsys.readouterr().out
    # The same checkpoint with the right activation passes.
    assert main(["--torch-ckpt", str(path), "--quiet", "--force"]) == 0


def test_a_failed_proof_writes_its_report_alone(tmp_path, capsys):
    """The fast set's parity failure: float32 logits of two frameworks differ by ~1e-7, more
    than a tolerance of 1e-12 allows."""
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    code = main(["--torch-ckpt", str(path), "--tolerance", "1e-12", "--output", str(out)])
    assert code == 1 and "parity FAILED" in capsys.readouterr().out
    assert directory_entries(out) == ["RECORD", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "parity_failed" and report["files"] == []
    assert not report["parity"]["passed"] and report["parity"]["max_abs"] > 1e-12


def test_parity_images_and_json(tmp_path, capsys):
    import tensorflow as tf

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (32, 32)]):
        png = tf.io.encode_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        tf.io.write_file(str(images / f"img{i}.png"), png)
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    code = main(["--torch-ckpt", str(path), "--parity-images", str(images), "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["num_inputs"] == 2 + 3
    assert [s["count"] for s in report["parity"]["inputs"]] == [2, 3]
    assert report["parity"]["top1_agreement"] == 1.0
    assert len(report["parity"]["stages"]) == TINY["depth"] + 2


def test_parity_runs_released_variants_at_224_and_a_costly_network_smaller():
    """What parity keeps of one image follows the network: every variant at its input size
    (the released ones' 224 px), while a patch of 1 px, whose stages each hold the whole 224 x 224 x dim map,
    runs on smaller images, and a network too wide for even one patch on one patch."""
    from convmixer_tf.config import VARIANTS, ConvMixerConfig
    from weights_converter.parity import PARITY_BUDGET_BYTES, parity_size, stage_bytes

    for name, variant in VARIANTS.items():  # the released ones at 224, CIFAR-10's at 32
        size = variant.preprocessing.input_size
        assert parity_size(variant.config, size) == size, name
    costly = ConvMixerConfig(dim=256, depth=4, kernel_size=1, patch_size=1, num_classes=3)
    size = parity_size(costly, 224)
    assert stage_bytes(costly, 224) > PARITY_BUDGET_BYTES >= stage_bytes(costly, size)
    assert stage_bytes(costly, size + 1) > PARITY_BUDGET_BYTES and size >= 100
    wide = ConvMixerConfig(dim=1 << 24, depth=2, kernel_size=3, patch_size=7, num_classes=3)
    assert parity_size(wide, 224) == 7
    assert parity_size(ConvMixerConfig(**TINY), 32) == 32


def test_parity_says_the_size_it_ran_at(tmp_path, capsys, monkeypatch):
    """A network whose stages would hold more than parity's budget at its input size is
    checked on smaller seeded images, stage by stage as ever, and the report and the
    progress line say which size and why; --parity-images still run at the input size."""
    from PIL import Image

    from convmixer_tf.config import ConvMixerConfig
    from weights_converter import parity

    monkeypatch.setattr(parity, "PARITY_BUDGET_BYTES", 1 << 20)
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 100, 50), (10, 220, 90)]):
        Image.new("RGB", (64, 48), colour).save(images / f"img{i}.png")
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    argv = ["--torch-ckpt", str(path), "--parity-images", str(images), "--output", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["parity"]
    size = parity.parity_size(ConvMixerConfig(**TINY), 224)
    assert size < 224 and size % TINY["patch_size"] == 0
    seeded, pictures = report["inputs"]
    assert seeded["size"] == size and report["input_shape"] == [size, size, 3]
    assert seeded["size_reason"].startswith("not the input size 224: one image's stage")
    assert pictures["size"] == 224 and report["num_inputs"] == 2 + pictures["count"]
    assert f"of {size} and 224 px (not the input size 224" in err, err
    assert len(report["stages"]) == TINY["depth"] + 2 and report["passed"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,limit_mib",
    [
        (dict(dim=256, depth=4, kernel_size=1, patch_size=1, num_classes=3), 3072),
        ("convmixer_768_32", 3072),
    ],
    ids=["patch 1", "convmixer_768_32"],
)
def test_what_parity_costs_follows_the_network(tmp_path, config, limit_mib):
    """A 1.1 MB checkpoint of ConvMixer-256/4 with a patch of 1 px peaked at 6.1 GB while
    parity held 224 px stages of two images in both networks at once, and a Keras model
    called eagerly kept every layer's output; convmixer_768_32 peaked at 3.5 GB. Both now
    stay well under 3 GiB (the start-up alone, TensorFlow and torch, is over 1 GB)."""
    if isinstance(config, str):
        import timm

        from weights_converter.demo import randomize_batchnorm

        net = randomize_batchnorm(timm.create_model(config, pretrained=False), seed=3)
    else:
        net = timm_convmixer(**config)
    path = save_checkpoint(net.state_dict(), tmp_path / "m.pth")
    del net
    script = (
        "import resource, sys\n"
        "from weights_converter.__main__ import main\n"
        "code = main(sys.argv[1:])\n"
        "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "--torch-ckpt", str(path), "--quiet"],
        env=dict(
            os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    code, peak_mib = run.stdout.split()[-2:]
    assert code == "0", run.stderr[-3000:]
    assert int(peak_mib) < limit_mib, peak_mib


def test_existing_output_needs_force(tmp_path, capsys):
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--torch-ckpt", str(path), "--output", str(out), "--quiet"]) == 2
    assert "keep.txt" in capsys.readouterr().err and (out / "keep.txt").exists()
    # --force replaces only what the converter wrote: a folder of the user's stays.
    assert main(["--torch-ckpt", str(path), "--output", str(out), "--quiet", "--force"]) == 2
    assert "keep.txt" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert main(["--torch-ckpt", str(path), "--output", str(ours), "--quiet"]) == 0
    assert main(["--torch-ckpt", str(path), "--output", str(ours), "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["--torch-ckpt", str(path), "--output", str(ours), "--quiet", "--force"]) == 0
    assert directory_entries(ours) == ["README.md", "RECORD", "model.keras", "report.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left


def _bad_inputs(tmp_path):
    import torchvision

    good = timm_convmixer().state_dict()
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": good, "hook": Evil()}, evil)
    raw = tmp_path / "good.pth"
    save_checkpoint(good, raw)
    data = raw.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    save_checkpoint(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    save_checkpoint(
        {k: v for k, v in good.items() if k != "blocks.1.3.running_var"}, tmp_path / "missing.pth"
    )
    save_checkpoint(
        dict(good, **{"blocks.0.extra.weight": torch.zeros(3)}), tmp_path / "unexpected.pth"
    )
    save_checkpoint(
        dict(good, **{"blocks.1.1.weight": torch.zeros(16, 16, 3, 3)}), tmp_path / "shape.pth"
    )
    torch.save([1, 2, 3], tmp_path / "list.pth")
    return marker, {
        "evil.pth": "posix.system",
        "trunc.pth": "truncated",
        "empty.pth": "empty",
        "random.pth": "cannot read torch checkpoint",
        "random.safetensors": "cannot read",
        "resnet.pth": "not a ConvMixer checkpoint",
        "missing.pth": "missing key 'blocks.1.3.running_var'",
        "unexpected.pth": "unexpected key 'blocks.0.extra.weight'",
        "shape.pth": "wrong shape for 'blocks.1.1.weight'",
        "list.pth": "not a dict of tensors",
        "absent.pth": "not found",
    }


def test_bad_checkpoints_exit_2_with_one_line_and_no_output(tmp_path, capsys):
    marker, cases = _bad_inputs(tmp_path)
    for name, words in cases.items():
        before = set(os.listdir(tmp_path))
        code = main(["--torch-ckpt", str(tmp_path / name), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err)
        assert words in err, (name, err)
        assert set(os.listdir(tmp_path)) == before, name  # nothing written, no staging dir
    assert not marker.exists(), "unpickling ran code from the checkpoint"


def test_safetensors_converts_without_torch(tmp_path):
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "w.safetensors")
    script = (
        WITHOUT_TORCH + "from weights_converter import convert_checkpoint\n"
        f"m = convert_checkpoint({str(path)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(m.count_params())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mapping_table_covers_every_weight_once():
    from convmixer_tf import ConvMixer, ConvMixerConfig
    from weights_converter.mapping import weight_table

    for depthwise in (True, False):
        cfg = ConvMixerConfig(**TINY, depthwise=depthwise)
        rows = weight_table(cfg)
        model = ConvMixer(**cfg.to_dict())
        assert len({(r.layer, r.weight) for r in rows}) == len(rows) == len(model.weights)
        assert len({r.key for r in rows}) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"]
)
def test_full_size_released_variants_parity(tmp_path, name):
    import timm

    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=3).eval()
    path = save_checkpoint(net.state_dict(), tmp_path / f"{name}.pth.tar", wrapper="state_dict")
    report = convert_and_verify(ConvertOptions(path))
    assert report.conversion["matched_variant"] == name
    assert report.parity.max_abs <= 1e-4, report.parity
    assert report.parity.top1_agreement == 1.0
    assert report.passed


def test_export_from_the_converter(tmp_path, capsys):
    path = save_checkpoint(
        sequential_convmixer(kernel_size=7).state_dict(), tmp_path / "m.pth", wrapper="state_dict"
    )
    out = tmp_path / "out"
    code = main(
        [
            "--torch-ckpt",
            str(path),
            "--output",
            str(out),
            "--export",
            "all",
            "--processes",
            "1",
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["path"] for row in report["files"]]
    assert names == [
        "model.keras",
        "saved_model",
        "model.tflite",
        "model_float16.tflite",
        "model_dynamic.tflite",
        "model_int8.tflite",
        "model.onnx",
        "model_int8.onnx",
    ]
    assert sorted(os.listdir(out)) == sorted(names + ["README.md", "RECORD", "report.json"])
    assert json.load(open(out / "report.json"))["files"] == report["files"]


def test_failed_export_exits_1_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from convmixer_tf.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "GELU_FORM", "builtin")  # unconvertible Erfc
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    code = main(
        [
            "--torch-ckpt",
            str(path),
            "--output",
            str(tmp_path / "out"),
            "--export",
            "tflite",
            "onnx",
            "--processes",
            "1",
            "--quiet",
        ]
    )
    assert code == 1
    assert "Erfc" in capsys.readouterr().err
    assert directory_entries(tmp_path) == ["m.pth"]


def test_without_torch_parity_is_a_clear_error_or_skipped(tmp_path):
    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "w.safetensors")
    script = (
        WITHOUT_TORCH + "from weights_converter.__main__ import main\n"
        f"code = main(['--torch-ckpt', {str(path)!r}, '--quiet'])\n"
        "assert code == 2, code\n"
        f"code = main(['--torch-ckpt', {str(path)!r}, '--quiet', '--skip-parity'])\n"
        "assert code == 0, code\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error: parity needs the PyTorch network" in proc.stderr
    assert directory_entries(tmp_path / "w_keras") == [
        "README.md",
        "RECORD",
        "model.keras",
        "report.json",
    ]


def test_sigterm_mid_export_leaves_nothing(tmp_path):
    import glob
    import signal
    import time

    path = save_checkpoint(timm_convmixer().state_dict(), tmp_path / "m.pth")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weights_converter",
            "--torch-ckpt",
            str(path),
            "--export",
            "all",
            "--quiet",
        ],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not glob.glob(str(tmp_path / ".m_keras.partial-*"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    time.sleep(0.5)  # past the staging directory's creation, into the exports
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert directory_entries(tmp_path) == ["m.pth"]


def test_a_labels_file_names_the_classes_or_is_refused_naming_it(tmp_path, capsys):
    import convmixer_tf

    net = timm_convmixer()
    path = save_checkpoint(net.state_dict(), tmp_path / "m.pth")
    net.reset_classifier(0)
    headless = save_checkpoint(net.state_dict(), tmp_path / "headless.pth")
    (tmp_path / "ten.txt").write_text("\n".join(f"class {i}" for i in range(10)))
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    for checkpoint, names, words in (
        (path, "two.txt", "labels file: 2 class names for a model with 10 classes"),
        (headless, "ten.txt", "class names were given (labels file), but the checkpoint has no"),
    ):
        argv = ["--torch-ckpt", str(checkpoint), "--labels", str(tmp_path / names), "--quiet"]
        assert main([*argv, "--output", str(tmp_path / "refused")]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "refused").exists()
    argv = ["--torch-ckpt", str(path), "--labels", str(tmp_path / "ten.txt"), "--quiet", "--json"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["conversion"]["class_names"] == "labels file"
    model = convmixer_tf.load_model(tmp_path / "out" / "model.keras")
    assert convmixer_tf.facts_of(model).class_names == tuple(f"class {i}" for i in range(10))
