"""--force replaces an earlier output of the same command and nothing else: a path is the
command's own only when it is exactly something the command writes, matched one path
segment at a time. Every shape of user file beside every path the converter, export and
training really write is refused (exit 2), and every file survives byte for byte."""

import os
import shutil

import pytest
from conftest import write_folder
from test_safety import checksums, one_error_line

from convmixer_tf import outputs, temporaries

# What a user leaves beside a path NAME that a command wrote: (what to write, what to remove after).
SHAPES = {
    "backup copy": lambda name: (f"{name}.bak", f"{name}.bak"),
    "editor copy": lambda name: (f"{name}~", f"{name}~"),
    "old folder": lambda name: (f"{name}.old/thesis.txt", f"{name}.old"),
    "dot-file": lambda name: (f".{name}", f".{name}"),
    "partial-looking file": lambda name: (f".{name}.partial", f".{name}.partial"),
    "partial-looking folder": lambda name: (f"{name}.partial-1/notes.txt", f"{name}.partial-1"),
    "file inside it": lambda name: (f"{name}/mine.txt", f"{name}/mine.txt"),  # a folder it wrote
}


def _export(*argv):
    from convmixer_tf.export.__main__ import main

    return main([*map(str, argv), "--processes", "1", "--quiet"])


def _convert(*argv):
    from weights_converter.__main__ import main

    return main([*map(str, argv), "--processes", "1", "--quiet"])


def _train(*argv):
    from convmixer_tf.train.__main__ import main

    return main([*map(str, argv), "--quiet"])


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_keras):
    """An earlier output of each command, as it really writes them: {command: (folder, kind, rerun)}."""
    from torch_helpers import save_checkpoint, timm_convmixer

    from convmixer_tf.export.__main__ import output_kind
    from convmixer_tf.train.folder import RUN
    from weights_converter.pipeline import output_kind as converter_kind

    root = tmp_path_factory.mktemp("earlier")
    ckpt = save_checkpoint(timm_convmixer().state_dict(), root / "m.pth")
    data = write_folder(root / "data", per_class=4)
    runs = {
        "converter": (
            converter_kind(),
            lambda out, *more: _convert(
                "--torch-ckpt", ckpt, "--output", out, "--export", "saved_model", "tflite", *more
            ),
        ),
        "export": (
            output_kind(),
            lambda out, *more: _export(
                "--model", tiny_keras, "--formats", "saved_model", "onnx", "--output", out, *more
            ),
        ),
        "train": (
            RUN,
            lambda out, *more: _train(
                "--init",
                tiny_keras,
                "--data-dir",
                data,
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--output",
                out,
                *more,
            ),
        ),
    }
    made = {}
    for command, (kind, run) in runs.items():
        out = root / command
        assert run(out) == 0
        made[command] = (out, kind, run)
    assert (
        made["train"][0] / "logs" / "train"
    ).is_dir()  # TensorBoard's folders are part of the tree
    return made


def _written(out):
    """Every file and folder under `out`, relative."""
    found = []
    for folder, dirs, files in os.walk(out):
        found += [os.path.relpath(os.path.join(folder, name), out) for name in dirs + files]
    return sorted(found)


@pytest.mark.parametrize("command", ["converter", "export", "train"])
def test_a_users_file_beside_any_written_path_is_refused(earlier, command):
    out, kind, _ = earlier[command]
    # the output alone: replaceable
    assert outputs.check_replaceable(out, kind, force=True) == str(out)
    cases = 0
    for written in _written(out):
        folder, name = os.path.split(written)
        for shape, make in SHAPES.items():
            created, removed = (os.path.join(out, folder, part) for part in make(name))
            if os.path.lexists(created) or os.path.isfile(os.path.dirname(created)):
                continue  # "NAME/mine.txt" applies beside a folder only
            os.makedirs(os.path.dirname(created), exist_ok=True)
            with open(created, "w") as f:
                f.write("mine")
            before = checksums(out)
            with pytest.raises(outputs.OutputExistsError, match="did not write") as refused:
                outputs.check_replaceable(out, kind, force=True)
            assert os.path.relpath(created, out).replace(os.sep, "/") in str(refused.value), (
                shape,
                written,
            )
            assert checksums(out) == before
            if os.path.isdir(removed):
                shutil.rmtree(removed)
            else:
                os.remove(removed)
            cases += 1
    assert cases >= 5 * len(SHAPES)
    assert outputs.check_replaceable(out, kind, force=True) == str(out)  # nothing left behind


def test_the_issues_repro_export_force_over_a_saved_model_with_a_users_files(
    tmp_path, tiny_keras, capsys
):
    out = tmp_path / "out"
    assert _export("--model", tiny_keras, "--formats", "saved_model", "--output", out) == 0
    variables = out / "saved_model" / "variables"
    (variables / "variables.index.bak").write_bytes((variables / "variables.index").read_bytes())
    (variables / "variables.old").mkdir()
    (variables / "variables.old" / "thesis.txt").write_text("mine")
    before = checksums(out)
    assert _export("--model", tiny_keras, "--formats", "onnx", "--output", out, "--force") == 2
    line = one_error_line(capsys)
    assert "variables.index.bak" in line and "variables.old/thesis.txt" in line
    assert checksums(out) == before


def test_train_force_refuses_a_users_folder_named_like_tensorboards_or_a_processs(earlier, capsys):
    out, _, rerun = earlier["train"]
    for mine in (
        out / "logs" / "train" / "events.out.tfevents.1.host.1.0.v2" / "thesis.txt",
        out / "backup" / "process_old" / "latest.weights.h5",
    ):
        mine.parent.mkdir(parents=True)
        mine.write_text("mine")
        before = checksums(out)
        assert rerun(out, "--force") == 2
        assert str(mine.relative_to(out)) in one_error_line(capsys)
        assert checksums(out) == before
        shutil.rmtree(mine.parent)


def test_converter_force_refuses_a_users_copy_in_its_saved_model(earlier, capsys):
    out, _, rerun = earlier["converter"]
    mine = out / "saved_model" / "variables" / "variables.data-00000-of-00001.bak"
    mine.write_text("mine")
    before = checksums(out)
    assert rerun(out, "--force") == 2
    assert "variables.data-00000-of-00001.bak" in one_error_line(capsys)
    assert checksums(out) == before
    mine.unlink()


def test_a_killed_writers_temporary_file_is_ours_and_only_its(tmp_path):
    kind = outputs.Output(
        "tool", "report.json", lambda data: True, outputs.exactly("report.json", "model.keras")
    )
    (tmp_path / "report.json").write_text("{}")
    temporary = os.path.basename(
        temporaries.temporary_name(tmp_path / "model.keras", suffix=".keras")
    )
    (tmp_path / temporary).write_text("half a model")
    assert kind.foreign(tmp_path) == []
    for name in (
        ".model.keras.partial",
        ".thesis.txt.123-456.deadbeef.partial",
        ".x.partial.keras",
    ):
        (tmp_path / name).write_text("mine")
        assert kind.foreign(tmp_path) == [name]
        (tmp_path / name).unlink()
