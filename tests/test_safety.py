"""Nothing of the user's is lost, nothing is misreported: --force, racing writers, class
identity, bad pixels, bad weights, staging leftovers, and the small cases. Each test is
a repro of what a careless or hostile user did, then what survives and the exit code."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from conftest import write_folder

import convmixer_tf
from convmixer_tf import labels, outputs, staging, temporaries
from convmixer_tf.facts import FACTS_FILE, attach, facts_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO)


def checksums(root):
    """{relative path: sha256} of every file under root (what must survive)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from torch_helpers import save_checkpoint, timm_convmixer

    d = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(timm_convmixer().state_dict(), d / "good.pth")


def convert(*argv):
    from weights_converter.__main__ import main

    # One file after the other: the tests of the side-by-side writers are test_parallel_export's.
    return main([*map(str, argv), "--processes", "1", "--quiet"])


# ---------------------------------------------------------------- 1. --force and inputs


def test_converter_force_never_deletes_its_input_or_the_users_files(tmp_path, checkpoint, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "good.pth").write_bytes(open(checkpoint, "rb").read())
    (d / "notes.txt").write_text("my notes")
    before = checksums(d)
    assert convert("--torch-ckpt", d / "good.pth", "--output", d, "--force") == 2
    assert "contains the input" in one_error_line(capsys)
    # a parent folder
    assert convert("--torch-ckpt", d / "good.pth", "--output", tmp_path, "--force") == 2
    one_error_line(capsys)
    os.symlink(d, tmp_path / "link")  # the same folder through a link
    assert convert("--torch-ckpt", d / "good.pth", "--output", tmp_path / "link", "--force") == 2
    one_error_line(capsys)
    assert checksums(d) == before


def test_export_force_never_deletes_the_model(tmp_path, tiny_keras, capsys):
    from convmixer_tf.export.__main__ import main

    d = tmp_path / "d"
    d.mkdir()
    (d / "model.keras").write_bytes(open(tiny_keras, "rb").read())
    before = checksums(d)
    assert main(["--model", str(d / "model.keras"), "--output", str(d), "--force", "--quiet"]) == 2
    assert "contains the input" in one_error_line(capsys)
    assert checksums(d) == before


def test_train_force_replaces_only_its_own_run_folders(tmp_path, tiny_keras, capsys):
    from convmixer_tf.train.__main__ import main

    data = write_folder(tmp_path / "data", per_class=4)
    thesis = tmp_path / "mine"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("three years of work")
    before_data, before_thesis = checksums(data), checksums(thesis)
    common_args = [
        "--init",
        tiny_keras,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--no-tensorboard",
        "--quiet",
    ]
    assert main(["--data-dir", data, "--output", data, "--force", *common_args]) == 2
    assert "is the input" in one_error_line(capsys)
    assert main(["--data-dir", data, "--output", str(thesis), "--force", *common_args]) == 2
    assert "thesis.txt" in one_error_line(capsys)
    assert checksums(data) == before_data and checksums(thesis) == before_thesis
    # A run folder of ours is replaced, unless it holds an input (here the --init model).
    run = tmp_path / "run"
    assert main(["--data-dir", data, "--output", str(run), *common_args]) == 0
    assert main(["--data-dir", data, "--output", str(run), "--force", *common_args]) == 0
    inside = run / "model.keras"
    assert (
        main(
            [
                "--init",
                str(inside),
                "--data-dir",
                data,
                "--output",
                str(run),
                "--force",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--no-tensorboard",
                "--quiet",
            ]
        )
        == 2
    )
    assert "contains the input" in one_error_line(capsys) and inside.exists()


# ---------------------------------------------------------------- 2. racing writers


def _race(tmp_path, checkpoint, out, *extra):
    command = [
        sys.executable,
        "-m",
        "weights_converter",
        "--torch-ckpt",
        str(checkpoint),
        "--output",
        str(out),
        "--json",
        "--quiet",
        *extra,
    ]
    procs = [
        subprocess.Popen(
            command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    deadline = time.time() + 120
    staged = set()
    while len(staged) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        staged |= {e for e in os.listdir(tmp_path) if e.startswith(f".{out.name}.partial-")}
        time.sleep(0.05)
    results = [(p.wait(timeout=300),) + p.communicate() for p in procs]
    assert len(staged) == 2, "the two writers did not overlap"
    return results


@pytest.mark.slow
def test_two_converters_racing_to_one_new_output(tmp_path, checkpoint):
    out = tmp_path / "out"
    results = _race(tmp_path, checkpoint, out)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert (
        "appeared while this run was writing it" in loser and len(loser.strip().splitlines()) == 1
    )
    winner = json.loads(next(out_ for code, out_, _ in results if code == 0))
    assert json.load(open(out / "report.json")) == winner and "replaced" not in winner
    assert not [e for e in os.listdir(tmp_path) if ".partial" in e]


@pytest.mark.slow
def test_with_force_the_last_writer_wins_and_says_so(tmp_path, checkpoint):
    out = tmp_path / "out"
    results = _race(tmp_path, checkpoint, out, "--force", "--export", "tflite", "onnx")
    assert [code for code, _, _ in results] == [0, 0], results
    reports = [json.loads(stdout) for _, stdout, _ in results]
    assert sorted(r.get("replaced", "") for r in reports) == [
        "",
        "output written meanwhile by another run",
    ]
    assert (
        json.load(open(out / "report.json"))["replaced"]
        == "output written meanwhile by another run"
    )
    assert not [e for e in os.listdir(tmp_path) if ".partial" in e]


def test_a_folder_made_in_the_last_instant_is_never_replaced(tmp_path, monkeypatch):
    """The user's folder appears between the last look and the final rename: even with
    --force it is refused, not moved aside and removed."""
    out = tmp_path / "out"
    real_rename = staging._move

    def user_gets_there_first(src, dst):
        if os.fspath(dst) == os.fspath(out) and not out.exists():
            out.mkdir()
            (out / "thesis.txt").write_text("mine")
        return real_rename(src, dst)

    monkeypatch.setattr(staging, "_move", user_gets_there_first)
    with pytest.raises(outputs.OutputExistsError, match="thesis.txt"):
        with staging.staged(out, force=True) as staged:
            open(os.path.join(staged.path, "report.json"), "w").write("{}")
    assert sorted(os.listdir(out)) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "mine"
    assert [e for e in os.listdir(tmp_path) if ".partial" in e] == []


def test_the_final_move_says_again_what_it_replaces_when_another_run_moves_in_first(
    tmp_path, monkeypatch
):
    """Another run of ours moves its output into place between this run's last look and its
    move: the report is written again, saying so, before the move that replaces it."""
    out = tmp_path / "out"
    real_rename = staging._move
    others = []

    def another_run_gets_there_first(src, dst):
        if os.fspath(dst) == os.fspath(out) and not others:
            others.append("done")
            with staging.staged(out) as other:
                open(os.path.join(other.path, "report.json"), "w").write("theirs")
        return real_rename(src, dst)

    monkeypatch.setattr(staging, "_move", another_run_gets_there_first)
    said = []
    with staging.staged(out, force=True) as mine:
        for replaced in mine.moves():
            said.append(replaced)
            open(os.path.join(mine.path, "report.json"), "w").write(f"replaced: {replaced}")
    assert said == [None, "output written meanwhile by another run"]
    assert (out / "report.json").read_text() == f"replaced: {said[-1]}"
    assert outputs.not_ours(out) == []
    assert [e for e in os.listdir(tmp_path) if ".partial" in e] == []


def test_evaluate_output_written_meanwhile_is_not_replaced(tmp_path):
    path = tmp_path / "metrics.json"
    outputs.write_json_atomic(path, {"top1": 1.0}, exclusive=True)  # a new file: written
    with pytest.raises(outputs.OutputExistsError, match="appeared while this run was working"):
        outputs.write_json_atomic(path, {"top1": 0.5}, exclusive=True)
    assert json.load(open(path)) == {"top1": 1.0} and os.listdir(tmp_path) == ["metrics.json"]


# ---------------------------------------------------------------- 3. bad pixels


def _damage(folder):
    png = os.path.join(folder, "class0", "0.png")
    data = open(png, "rb").read()
    with open(png, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(folder, "class1", "broken.jpg"), "w") as f:
        f.write("<html>404 not found</html>")
    return png


def test_train_leaves_out_unreadable_images_or_refuses_them(tmp_path, tiny_keras, capsys):
    from convmixer_tf.train.__main__ import main

    data = write_folder(tmp_path / "data", per_class=5)
    truncated = _damage(data)
    args = [
        "--init",
        tiny_keras,
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--no-tensorboard",
    ]
    assert main([*args, "--output", str(tmp_path / "strict"), "--strict-images", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "unreadable image" in line and "(and 1 more)" in line and ".png" in line
    assert not (tmp_path / "strict").exists()
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert (
        f"left out unreadable image {truncated}" in err
        and "broken.jpg" in err
        and "Traceback" not in err
    )
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert sorted(os.path.basename(s["file"]) for s in metrics["skipped_images"]) == [
        "0.png",
        "broken.jpg",
    ]


def test_evaluate_leaves_out_unreadable_images_or_refuses_them(tmp_path, tiny_keras, capsys):
    from convmixer_tf.evaluate.__main__ import main

    data = write_folder(tmp_path / "data", per_class=3)
    _damage(data)
    assert main(["--model", tiny_keras, "--data-dir", data, "--strict-images", "--quiet"]) == 2
    assert "unreadable image" in one_error_line(capsys)
    assert main(["--model", tiny_keras, "--data-dir", data, "--json"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert metrics["count"] == 8 and len(metrics["skipped_images"]) == 2
    assert "2 unreadable images left out" in captured.err


# ---------------------------------------------------------------- 4. class identity


def test_evaluate_refuses_other_classes_in_a_process_of_its_own(tmp_path):
    """As a user runs it: the command imports TensorFlow first, then looks up timm's ImageNet
    names to tell a naming difference from other classes; with torch's CUDA build, loading
    triton after TensorFlow crashed the process (SIGSEGV) instead of this exit 2."""
    model = convmixer_tf.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=3, input_shape=(32, 32, 3)
    )
    attach(model, facts_of(model).replace(class_names=("cat", "dog", "eel")))
    trained = convmixer_tf.save_model(model, tmp_path / "pets.keras")
    fruit = write_folder(tmp_path / "fruit", per_class=2, names=["apple", "banana", "cherry"])
    command = [sys.executable, "-m", "convmixer_tf.evaluate", "--model", str(trained)]
    done = subprocess.run(
        [*command, "--data-dir", fruit, "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "class 0 is 'cat' in the model and 'apple' in the dataset" in done.stderr


def test_evaluate_refuses_a_dataset_of_other_classes(tmp_path, capsys):
    from convmixer_tf.evaluate.__main__ import main

    model = convmixer_tf.ConvMixer(
        dim=8,
        depth=1,
        kernel_size=3,
        patch_size=4,
        num_classes=3,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    trained = convmixer_tf.save_model(
        attach(model, facts_of(model).replace(class_names=("cat", "dog", "eel"))),
        tmp_path / "pets.keras",
    )
    fruit = write_folder(tmp_path / "fruit", per_class=2, names=["apple", "banana", "cherry"])
    pets = write_folder(tmp_path / "pets", per_class=2, names=["cat", "dog", "eel"])
    assert main(["--model", str(trained), "--data-dir", fruit, "--quiet"]) == 2
    assert "class 0 is 'cat' in the model and 'apple' in the dataset" in one_error_line(capsys)
    assert (
        main(
            [
                "--model",
                str(trained),
                "--data-dir",
                fruit,
                "--allow-class-mismatch",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["classes"].startswith("class mismatch allowed")
    assert main(["--model", str(trained), "--data-dir", pets, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == "the dataset's classes are the model's"
    # A model without stored names: the count is checked, and a warning says the rest is assumed.
    ten = tmp_path / "ten.keras"
    convmixer_tf.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=10, input_shape=(32, 32, 3)
    ).save(ten)
    assert main(["--model", str(ten), "--data-dir", fruit, "--quiet"]) == 2
    assert "the model has 10 classes, the dataset 3" in one_error_line(capsys)
    old = tmp_path / "old.keras"
    model.save(old)
    assert main(["--model", str(old), "--data-dir", fruit]) == 0
    assert "warning: the model stores no class names" in capsys.readouterr().err


# ---------------------------------------------------------------- 5, 6. foreign models, bad weights


def test_export_of_a_model_that_is_not_a_convmixer(tmp_path, capsys):
    import keras

    from convmixer_tf.export.__main__ import main

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "dense.keras")
    assert main(["--model", str(tmp_path / "dense.keras"), "--quiet"]) == 2
    assert "is not a ConvMixer" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["dense.keras"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_bad_input_not_a_parity_failure(tmp_path, capsys, value):
    from torch_helpers import save_checkpoint, timm_convmixer

    sd = timm_convmixer().state_dict()
    sd["blocks.1.1.weight"][0, 0, 0, 0] = float(value)
    path = save_checkpoint(sd, tmp_path / "bad.pth")
    assert convert("--torch-ckpt", path) == 2
    line = one_error_line(capsys)
    assert "'blocks.1.1.weight' holds 1 non-finite value" in line and "parity" not in line
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


# ---------------------------------------------------------------- 7. staging leftovers


def test_force_over_a_plain_file_is_refused_and_leaves_nothing(tmp_path, checkpoint, capsys):
    target = tmp_path / "out"
    target.write_text("a file of mine")
    assert convert("--torch-ckpt", checkpoint, "--output", target, "--force") == 2
    assert "is a file" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["out"] and target.read_text() == "a file of mine"


def test_staging_of_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path, checkpoint):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale = (
        tmp_path
        / f".out{staging.STAGING_INFIX}{dead.pid}-{temporaries.process_start_time(dead.pid)}-abc"
    )
    live = (
        tmp_path
        / f".out{staging.STAGING_INFIX}{os.getpid()}-{temporaries.process_start_time(os.getpid())}-def"
    )
    stale.mkdir()
    live.mkdir()
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert convert("--torch-ckpt", checkpoint, "--output", out) == 0
    assert not stale.exists() and live.exists()
    assert sorted(os.listdir(out)) == ["README.md", "RECORD", "model.keras", "report.json"]


def test_a_users_entries_named_like_temporaries_are_kept(tmp_path, monkeypatch):
    """Only a run's own kind of leftover is swept: beside an output, staging folders of
    that output; in TMPDIR, this project's temporary folders. A user's file or folder that
    merely looks like a killed writer's temporary (a dead pid in its name) is kept."""
    beside = tmp_path / "work"
    beside.mkdir()
    folder = beside / ".mine.999999-0.deadbeef.partial"
    folder.mkdir()
    (folder / "data.txt").write_text("precious")
    (beside / ".notes.999998-0.cafebabe.partial").write_text("notes")
    with staging.staged(beside / "out") as staged:
        (pathlib.Path(staged.path) / "a.txt").write_text("written")
    assert (folder / "data.txt").read_text() == "precious"
    assert (beside / ".notes.999998-0.cafebabe.partial").read_text() == "notes"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (scratch / "convmixer-999999-0-notes.txt").write_text("notes")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with temporaries.temporary_folder():
        pass
    assert (scratch / "convmixer-999999-0-notes.txt").read_text() == "notes"


# ---------------------------------------------------------------- 8. small ones


def test_small_cases_get_one_line_and_exit_2(tmp_path, checkpoint, tiny_keras, capsys):
    from convmixer_tf.export.__main__ import main as export_main

    with pytest.raises(SystemExit) as code:
        export_main(["--model", tiny_keras, "--image-size", "0"])
    assert code.value.code == 2 and "--image-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as code:
        convert("--torch-ckpt", checkpoint, "--calibration-count", "0")
    assert (
        code.value.code == 2
        and "--calibration-count: must be a positive number" in capsys.readouterr().err
    )
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(open(tiny_keras, "rb").read()[:3000])
    assert export_main(["--model", str(truncated), "--quiet"]) == 2
    assert "truncated or corrupt" in one_error_line(capsys)
    started = time.perf_counter()
    assert convert("--torch-ckpt", checkpoint, "--output", "/proc/no/such/place") == 2
    assert "cannot write output /proc/no/such/place" in one_error_line(capsys)
    assert time.perf_counter() - started < 5  # before reading, mapping or parity
    import torch

    torch.save({0: torch.zeros(2), 1: torch.ones(2)}, tmp_path / "intkeys.pth")
    assert convert("--torch-ckpt", tmp_path / "intkeys.pth") == 2
    assert "top-level keys ['0', '1']" in one_error_line(capsys)


# ---------------------------------------------------------------- 9. second round: nested files


def test_force_refuses_a_users_file_anywhere_inside_the_output(
    tmp_path, checkpoint, tiny_keras, capsys
):
    from convmixer_tf.export.__main__ import main as export_main

    converted, exported = tmp_path / "converted", tmp_path / "exported"
    assert (
        convert("--torch-ckpt", checkpoint, "--output", converted, "--export", "saved_model") == 0
    )
    assert (
        export_main(
            [
                "--model",
                tiny_keras,
                "--formats",
                "saved_model",
                "--output",
                str(exported),
                "--quiet",
            ]
        )
        == 0
    )
    for out, run in (
        (
            converted,
            lambda: convert(
                "--torch-ckpt",
                checkpoint,
                "--output",
                converted,
                "--export",
                "saved_model",
                "--force",
            ),
        ),
        (
            exported,
            lambda: export_main(
                [
                    "--model",
                    tiny_keras,
                    "--formats",
                    "saved_model",
                    "--output",
                    str(exported),
                    "--force",
                    "--quiet",
                ]
            ),
        ),
    ):
        for mine in (
            out / "saved_model" / "mine.txt",
            out / "saved_model" / "variables" / "notes" / "x.txt",
        ):
            mine.parent.mkdir(exist_ok=True)
            mine.write_text("mine")
            before = checksums(out)
            assert run() == 2
            assert str(mine.relative_to(out)) in one_error_line(capsys)
            assert checksums(out) == before
            mine.unlink()
        (out / "saved_model" / "variables" / "notes").rmdir()
        assert run() == 0  # without them, the earlier output is replaced


def test_train_force_refuses_a_users_file_in_logs_or_backup(tmp_path, tiny_keras, capsys):
    from convmixer_tf.train.__main__ import main

    data = write_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    args = [
        "--init",
        tiny_keras,
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--output",
        str(run),
        "--quiet",
    ]
    assert main(args) == 0 and (run / "logs" / "train").is_dir()
    for mine in (run / "logs" / "train" / "mine.txt", run / "backup" / "mine.txt"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("mine")
        before = checksums(run)
        assert main([*args, "--force"]) == 2
        assert str(mine.relative_to(run)) in one_error_line(capsys) and checksums(run) == before
        mine.unlink()


# ---------------------------------------------------------------- 10. a finished run survives a failed --force run


@pytest.fixture
def finished_run(tmp_path, tiny_keras):
    data = write_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    args = [
        "--init",
        tiny_keras,
        "--data-dir",
        data,
        "--batch-size",
        "4",
        "--output",
        str(run),
        "--quiet",
    ]
    from convmixer_tf.train.__main__ import main

    assert main([*args, "--epochs", "1"]) == 0 and (run / "metrics.json").exists()
    return run, args, checksums(run)


def test_a_finished_run_survives_a_diverging_force_run(finished_run, capsys):
    from convmixer_tf.train.__main__ import main

    run, args, before = finished_run
    assert main([*args, "--epochs", "2", "--lr", "1e30", "--clip-norm", "0", "--force"]) == 1
    assert "loss became" in one_error_line(capsys)
    assert checksums(run) == before and not [e for e in os.listdir(run.parent) if ".partial" in e]


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_finished_run_survives_an_interrupted_force_run(finished_run, signum):
    run, args, before = finished_run
    proc = subprocess.Popen(
        [sys.executable, "-m", "convmixer_tf.train", *args, "--epochs", "50", "--force"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and proc.poll() is None
        and not any(  # training, in its staging folder
            os.path.exists(os.path.join(run.parent, e, "history.csv"))
            for e in os.listdir(run.parent)
            if ".partial" in e
        )
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum
    assert checksums(run) == before and not [e for e in os.listdir(run.parent) if ".partial" in e]


def test_a_force_run_replaces_the_finished_run_once_it_has_finished(finished_run):
    from convmixer_tf.train.__main__ import main

    run, args, before = finished_run
    assert main([*args, "--epochs", "2", "--force"]) == 0
    assert json.load(open(run / "metrics.json"))["epochs"] == 2 and checksums(run) != before


# ---------------------------------------------------------------- 11. labels


@pytest.mark.parametrize(
    "text, words",
    [
        ("cat\nx\x00y\ndog\n", "line 2 holds the control character U+0000"),
        ("cat\ndog\x0bbird\neel\n", "line 2 holds the control character U+000B"),
        ("cat\ndog\u2028bird\n\n", "line 2 holds the control character U+2028"),
        ("cat\nbird\u2029\neel\n", "line 2 holds the control character U+2029"),
        ("a\na\nb\n", "repeats names ('a' on lines 1, 2)"),
        ("a\n\nb\n", "line 2 is empty"),
    ],
)
def test_bad_labels_are_refused_before_any_work(tmp_path, tiny_keras, capsys, text, words):
    from convmixer_tf.export.__main__ import main

    (tmp_path / "labels.txt").write_text(text, encoding="utf-8", newline="")
    before = sorted(os.listdir(tmp_path))
    started = time.perf_counter()
    assert (
        main(
            [
                "--model",
                tiny_keras,
                "--formats",
                "tflite",
                "--labels",
                str(tmp_path / "labels.txt"),
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert words in one_error_line(capsys) and sorted(os.listdir(tmp_path)) == before
    assert time.perf_counter() - started < 20  # before any export


def test_labels_without_their_bom_and_duplicates_when_asked(tmp_path, tiny_keras):
    from convmixer_tf.export import metadata
    from convmixer_tf.export.__main__ import main

    (tmp_path / "bom.txt").write_bytes("\ufeffcat\r\ndog\r\neel\r\n".encode())
    assert labels.read_labels(tmp_path / "bom.txt") == ("cat", "dog", "eel")
    (tmp_path / "twice.txt").write_text("cat\ncat\neel\n")
    assert (
        main(
            [
                "--model",
                tiny_keras,
                "--formats",
                "tflite",
                "--labels",
                str(tmp_path / "twice.txt"),
                "--allow-duplicate-labels",
                "--output",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    assert metadata.packed_labels(tmp_path / "out" / "model.tflite") == ["cat", "cat", "eel"]


# ---------------------------------------------------------------- 12. file modes


def test_folders_nested_past_python_s_recursion_limit_follow_the_umask(tmp_path, nested):
    """outputs.follow_umask walked with os.walk, which recursed once a level."""
    deepest = nested(1500)
    for path in (deepest, os.path.dirname(deepest)):
        os.chmod(path, 0o700)
    previous = os.umask(0o002)
    try:
        outputs.follow_umask(tmp_path / "deep")
    finally:
        os.umask(previous)
    assert {os.stat(p).st_mode & 0o777 for p in (deepest, os.path.dirname(deepest))} == {0o775}


def test_written_files_and_folders_follow_the_umask(tmp_path, checkpoint):
    # 002, not the usual 022: TensorFlow makes its folders 0755 whatever the umask, which 022 would hide.
    previous = os.umask(0o002)
    try:
        assert (
            convert(
                "--torch-ckpt",
                checkpoint,
                "--output",
                tmp_path / "out",
                "--export",
                "tflite",
                "onnx",
                "saved_model",
            )
            == 0
        )
    finally:
        os.umask(previous)
    modes = {
        os.path.relpath(os.path.join(folder, name), tmp_path): os.stat(
            os.path.join(folder, name)
        ).st_mode
        & 0o777
        for folder, dirs, files in os.walk(tmp_path / "out")
        for name in dirs + files
    }
    assert "out/saved_model/variables" in modes, modes
    assert modes and all(
        mode == (0o775 if os.path.isdir(tmp_path / path) else 0o664) for path, mode in modes.items()
    ), modes


# ---------------------------------------------------------------- 13. messages that say what is wrong


def test_messages_name_the_real_problem(tmp_path, checkpoint, tiny_keras, capsys):
    from convmixer_tf.export.__main__ import main as export_main

    assert export_main(["--model", str(tmp_path), "--quiet"]) == 2
    assert "is a folder, not a .keras file" in one_error_line(capsys)
    assert convert("--torch-ckpt", tmp_path) == 2
    assert "is a folder, not a checkpoint file" in one_error_line(capsys)
    os.symlink("loop", tmp_path / "loop")
    assert convert("--torch-ckpt", checkpoint, "--output", tmp_path / "loop" / "out") == 2
    assert "symbolic link that leads nowhere" in one_error_line(capsys)
    long_name = tmp_path / ("o" * 240)
    assert (
        convert("--torch-ckpt", checkpoint, "--output", long_name) == 0
        and (long_name / "model.keras").exists()
    )
    import zipfile

    for change, words in (
        (lambda facts: dict(facts, config=None), "'config' must be dict, got null"),
        (
            lambda facts: dict(facts, config=dict(facts["config"], num_classes=10)),
            "its stored facts do not match its layers",
        ),
    ):
        edited = tmp_path / "edited.keras"
        with zipfile.ZipFile(tiny_keras) as src, zipfile.ZipFile(edited, "w") as dst:
            for item in src.namelist():
                data = src.read(item)
                if item == FACTS_FILE:
                    data = json.dumps(change(json.loads(data)))
                dst.writestr(item, data)
        assert (
            export_main(["--model", str(edited), "--output", str(tmp_path / "x"), "--quiet"]) == 2
        )
        line = one_error_line(capsys)
        assert words in line and str(edited) in line, line


# ---------------------------------------------------------------- 14. tolerances that scale


def test_large_logits_export_and_a_wrong_activation_still_fails(tmp_path):
    from convmixer_tf import export as exporters

    model = convmixer_tf.ConvMixer(
        dim=16,
        depth=2,
        kernel_size=7,
        patch_size=2,
        num_classes=10,
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    # logits in the hundreds, as after a short run on a small set
    head.set_weights([kernel * 2000, bias])
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    assert np.abs(model.predict(x, verbose=0)).max() > 100
    options = exporters.ExportOptions(
        formats=("saved_model", "tflite", "onnx"),
        latency_runs=1,
        tflite_output="logits",
        processes=1,
    )
    rows = exporters.export_formats(model, tmp_path, options)
    assert all(r["passed"] and r["allowed"] > r["tolerance"] for r in rows), rows
    relu = convmixer_tf.ConvMixer(
        dim=16,
        depth=2,
        kernel_size=7,
        patch_size=2,
        num_classes=10,
        activation="relu",
        input_shape=(32, 32, 3),
        include_preprocessing=True,
    )
    relu.set_weights(model.get_weights())
    for row in rows:
        wrong = exporters.verify(tmp_path / row["path"], relu, x, tolerance=row["tolerance"])
        assert not wrong["passed"] and wrong["max_abs"] > 10 * wrong["allowed"], wrong
