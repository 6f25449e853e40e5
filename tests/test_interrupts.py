"""SIGTERM and SIGINT at any moment of a command: exit 128 + the signal, the earlier output
byte-identical, nothing of the run left (staging, temporary folders). Real processes,
signalled at moments spread over a run's own measured length, so the sweep holds
whatever else the machine is doing."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_safety import checksums

import convmixer_tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What others leave in TMPDIR: onnxruntime's session id (written at import, which may
# come before the command starts).
FOREIGN = re.compile(r"^\.ses$")


def handles(pid, signum=signal.SIGTERM) -> bool:
    """True once process `pid` catches `signum` (its SigCgt mask in /proc): the command
    line's start-up is done. Python itself catches SIGINT from the start, not SIGTERM."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


def start(command, tmp):
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp))
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not handles(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc


def sweep(command, out, tmp_path, fractions, signum=signal.SIGTERM):
    """Runs `command` once to the end (the earlier output, and how long a run takes), then
    once per fraction, signalled that far into a run. A run stopped by the signal must
    exit 128 + signum and leave the earlier output as it was; one the signal reached only
    after its final move (the end of its work) must exit 0 with its new output. Returns
    how many runs the signal stopped."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    started = time.time()
    first = start(command, tmp)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    length = time.time() - started
    before, stopped = checksums(out), 0
    for fraction in fractions:
        proc = start(command, tmp)
        time.sleep(fraction * length)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (0, 128 + signum), (fraction, proc.returncode, err[-3000:])
        # signalled after its final move: its output is the earlier one now
        if proc.returncode == 0:
            before = checksums(out)
            continue
        stopped += 1
        assert err.strip().splitlines()[-1] == "error: interrupted", err[-2000:]
        assert checksums(out) == before, fraction
        assert not [e for e in os.listdir(out.parent) if ".partial" in e], fraction
        assert [e for e in os.listdir(tmp) if not FOREIGN.match(e)] == [], (
            fraction,
            os.listdir(tmp),
        )
    return stopped


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.keras"
    convmixer_tf.save_model(
        convmixer_tf.ConvMixer(
            dim=8,
            depth=1,
            kernel_size=7,
            patch_size=4,
            num_classes=3,
            input_shape=(32, 32, 3),
            include_preprocessing=True,
        ),
        path,
    )
    return path


def export_command(model, out):
    """The export command with its defaults (every format, side by side where it can)."""
    return [
        sys.executable,
        "-m",
        "convmixer_tf.export",
        "--model",
        str(model),
        "--formats",
        "all",
        "--calibration-count",
        "4",
        "--output",
        str(out),
        "--force",
        "--quiet",
    ]


@pytest.mark.slow
def test_sigterm_at_any_moment_of_an_export(tmp_path, tiny_model):
    out = tmp_path / "out"
    fractions = [i / 16 for i in range(15)]  # 0: the moment start-up is done
    assert sweep(export_command(tiny_model, out), out, tmp_path, fractions) >= len(fractions) - 2


@pytest.mark.slow
def test_sigterm_at_a_few_moments_of_an_export(tmp_path, tiny_model):
    """Two points of the sweep above: start-up, and mid-run (workers side by side)."""
    out = tmp_path / "out"
    assert sweep(export_command(tiny_model, out), out, tmp_path, (0.0, 0.4)) >= 1


def test_sigint_mid_export(tmp_path, tiny_model):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.export",
        "--model",
        str(tiny_model),
        "--formats",
        "tflite",
        "onnx",
        "--output",
        str(out),
        "--processes",
        "1",
        "--force",
        "--quiet",
    ]
    assert sweep(command, out, tmp_path, (0.4,), signal.SIGINT) == 1


@pytest.mark.slow
def test_sigterm_at_any_moment_of_a_conversion(tmp_path):
    from torch_helpers import save_checkpoint, timm_convmixer

    ckpt = save_checkpoint(timm_convmixer(kernel_size=7).state_dict(), tmp_path / "m.pth")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "weights_converter",
        "--torch-ckpt",
        str(ckpt),
        "--export",
        "all",
        "--calibration-count",
        "4",
        "--output",
        str(out),
        "--force",
        "--quiet",
    ]
    fractions = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
    assert sweep(command, out, tmp_path, fractions) >= len(fractions) - 2


def workers_of(pid) -> list:
    """The worker processes (multiprocessing's spawn) whose parent is `pid` (from /proc),
    zombies aside."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if "--multiprocessing-fork" in command and int(parent) == pid and state != "Z":
            found.append(int(entry))
    return found


def mapped(pid) -> str:
    """What process `pid` has mapped ("" once it has ended: it may end between listing and reading)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    "signum",
    [signal.SIGKILL, signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_a_signal_to_an_export_ends_its_workers(tmp_path, tiny_model, signum):
    """The workers writing formats side by side never go on computing without their
    parent: SIGTERM and SIGINT end them before the command exits (128 + the signal, nothing
    left behind); kill -9, which no handler sees, ends them too (an orphan would go on
    until its formats are written: seconds here, minutes for a released model). Signalled
    once a worker has TensorFlow loaded (so it has started), they are gone at once."""
    from convmixer_tf.export import parallel

    if parallel.cores() < 2 or not parallel.memory_allows(convmixer_tf.load_model(tiny_model)):
        pytest.skip("this machine writes the formats in one process: no worker to end")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    command = export_command(tiny_model, out)
    proc = start(command, tmp)
    deadline, workers = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        workers = [w for w in workers_of(proc.pid) if "libtensorflow" in mapped(w)]
        if workers:
            break
        time.sleep(0.05)
    assert workers, "no export worker started"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if signum != signal.SIGKILL:  # the command itself waits for its workers' end
        assert not any(alive(w) for w in workers)
        assert (
            proc.returncode == 128 + signum and err.strip().splitlines()[-1] == "error: interrupted"
        )
        assert not out.exists() and [e for e in os.listdir(tmp) if not FOREIGN.match(e)] == []
    deadline = time.time() + 2
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers)


def test_the_temporary_folder_of_a_killed_command_is_removed_by_the_next(tmp_path, tiny_model):
    """kill -9 reaches no handler: the command's temporary folder (a copy of the model, and
    more) stays until the next command removes it; a live process's is left alone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp))
    script = (
        "import time\nfrom convmixer_tf import temporaries\n"
        "print(temporaries.make_temporary_folder(), flush=True)\ntime.sleep(300)\n"
    )
    live = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        live_folder = live.stdout.readline().strip()
        killed = start(
            [
                sys.executable,
                "-m",
                "convmixer_tf.export",
                "--model",
                str(tiny_model),
                "--formats",
                "tflite",
                "--output",
                str(tmp_path / "out"),
                "--processes",
                "1",
                "--quiet",
            ],
            tmp,
        )
        deadline, left = time.time() + 60, []
        while not left and time.time() < deadline:
            left = [e for e in os.listdir(tmp) if e.startswith(f"convmixer-{killed.pid}-")]
            time.sleep(0.01)
        killed.kill()
        killed.communicate(timeout=60)
        assert len(left) == 1 and (tmp / left[0]).is_dir()  # left behind
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "convmixer_tf.export",
                "--model",
                str(tmp_path / "absent.keras"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 2 and "model not found" in again.stderr
        assert not (tmp / left[0]).exists() and os.path.isdir(live_folder)
    finally:
        live.kill()
        live.communicate()


def test_a_command_keeps_its_temporary_files_in_one_folder_and_restores_the_environment(
    monkeypatch, tmp_path
):
    """During a command, TMPDIR (what child processes read) and tempfile's own folder are one
    private folder; afterwards both are what they were and the folder is gone."""
    import tempfile

    from convmixer_tf import cli, temporaries

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    seen = {}

    def job(log, console):
        seen["env"], seen["tempfile"] = os.environ["TMPDIR"], tempfile.gettempdir()
        return 0

    assert cli.run_command(job) == 0
    assert seen["env"] == seen["tempfile"] and os.path.dirname(seen["env"]) == str(tmp_path)
    assert temporaries.TEMPORARY_FOLDER.fullmatch(os.path.basename(seen["env"]))
    assert not os.path.exists(seen["env"])
    assert os.environ["TMPDIR"] == str(tmp_path) and tempfile.tempdir is None
    monkeypatch.delenv("TMPDIR")
    with temporaries.environment(TMPDIR="elsewhere", OTHER="x"):
        assert os.environ["TMPDIR"] == "elsewhere"
    assert "TMPDIR" not in os.environ and "OTHER" not in os.environ


@pytest.mark.parametrize(
    "moment, signum",
    [
        ("numpy", signal.SIGINT),
        ("convmixer_tf.facts", signal.SIGINT),
        ("convmixer_tf.predict", signal.SIGINT),
        ("convmixer_tf.config", signal.SIGTERM),
    ],
)
def test_a_signal_while_a_command_still_imports_is_its_exit_code_in_one_line(
    tiny_model, moment, signum
):
    """Start-up included: a signal while the command's modules are still being imported,
    before `cli.run_command` sets its handler, is 128 + the signal and `error: interrupted`
    (it was a KeyboardInterrupt traceback and exit 1 or death by SIGINT; death by SIGTERM).
    The moment is the line `python -X importtime` writes when that module has loaded."""
    image = os.path.join(os.path.dirname(tiny_model), "x.png")
    if not os.path.exists(image):
        from PIL import Image

        Image.new("RGB", (40, 40)).save(image)
    command = [sys.executable, "-X", "importtime", "-m", "convmixer_tf.predict"]
    with subprocess.Popen(
        [*command, "--model", str(tiny_model), image],
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        for line in proc.stderr:
            if line.startswith("import time:") and line.split("|")[-1].strip() == moment:
                proc.send_signal(signum)
                break
        said = [line for line in proc.stderr if not line.startswith("import time:")]
    assert proc.returncode == 128 + signum, said
    assert said == ["error: interrupted\n"]
