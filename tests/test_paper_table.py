"""benchmarks/paper_table.py in its quick mode: every network of the paper's table measured
in the runtimes that can run it, parameters as timm itself counts them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convmixer_gmacs(name, size=224):
    """Multiply-adds of a ConvMixer at `size` px, counted by hand: the patch embedding, each
    block's depthwise and pointwise convolutions, the head (BatchNorm and activations aside,
    as PyTorch's FLOP counter leaves them)."""
    from convmixer_tf import get_variant

    c = get_variant(name).config
    positions = (size // c.patch_size) ** 2
    blocks = c.depth * positions * c.dim * (c.kernel_size**2 + c.dim)
    return (positions * c.dim * 3 * c.patch_size**2 + blocks + c.dim * c.num_classes) / 1e9


@pytest.mark.slow
def test_the_paper_table_in_quick_mode_as_its_notebook_makes_it(tmp_path, monkeypatch):
    """notebooks/04 runs `benchmarks/paper_table.py --quick` (CI's small settings) and shows
    the table it writes; the table is checked here."""
    import timm
    from test_notebooks import NOTEBOOKS, run_notebook

    (notebook,) = [path for path in NOTEBOOKS if "04_the_paper" in path]
    run_notebook(notebook, tmp_path, monkeypatch)
    written = tmp_path / "notebook_outputs" / "04_paper"
    result = json.load(open(written / "paper_table.json"))
    table = open(written / "paper_table.md").read()
    assert result["quick"] and "Quick run" in table
    rows = result["rows"]
    assert [row["network"] for row in rows] == [
        "ConvMixer-1536/20",
        "ConvMixer-768/32",
        "ResNet-152",
        "DeiT-B",
        "ResMLP-B24/8",
    ]
    for row in rows:
        count = sum(
            p.numel() for p in timm.create_model(row["timm"], pretrained=False).parameters()
        )
        assert row["params"] == count, row["network"]
        assert f"| {row['network']} | " in table and f" | {count / 1e6:.1f} | " in table
        assert row["gmacs"] > 0
        measured = {name for name, figures in row["runtimes"].items() if "throughput" in figures}
        if row["timm"].startswith("convmixer"):
            assert row["params_keras"] == count  # our Keras model: the same network
            assert row["gmacs"] == pytest.approx(convmixer_gmacs(row["timm"]), rel=1e-6)
            assert measured == {
                "PyTorch eager",
                "ONNX fp32",
                "TFLite fp32",
                "TFLite int8",
                "ONNX int8",
            }
        else:
            assert measured == {"PyTorch eager", "ONNX fp32"}
            assert "no converter here" in row["runtimes"]["TFLite fp32"]["not_measured"]
        for name in measured:
            assert (
                row["runtimes"][name]["throughput"] > 0 and row["runtimes"][name]["latency_ms"] > 0
            )
    base = rows[2]["runtimes"]
    for ratio in result["ratios"]:
        row = next(r for r in rows if r["network"] == ratio["convmixer"])
        if ratio["runtime"] == "PyTorch eager":
            expected = (
                base["PyTorch eager"]["throughput"] / row["runtimes"]["PyTorch eager"]["throughput"]
            )
            assert ratio["measured"] == pytest.approx(expected)
            assert ratio["paper"] == pytest.approx(
                rows[2]["paper"]["throughput"] / row["paper"]["throughput"]
            )


def test_benchmarks_never_write_over_a_users_files(tmp_path):
    """--output-dir of the table and --json of the export-time benchmark follow the commands'
    rule: a user's file there is refused at once (exit 2, one line), before any measuring,
    and left as it was."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paper_table.md").write_text("my notes")
    mine = tmp_path / "figures.json"
    mine.write_text('{"mine": true}')
    for script, option, target in (
        ("paper_table.py", "--output-dir", notes),
        ("bench_export_time.py", "--json", mine),
    ):
        done = subprocess.run(
            [sys.executable, os.path.join(REPO, "benchmarks", script), option, str(target)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stdout == "", (
            script,
            done.stderr,
        )
    assert (notes / "paper_table.md").read_text() == "my notes" and os.listdir(notes) == [
        "paper_table.md"
    ]
    assert mine.read_text() == '{"mine": true}' and sorted(os.listdir(tmp_path)) == [
        "figures.json",
        "notes",
    ]


def _children(pid) -> list:
    """Live processes whose parent is `pid`, with their command lines."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
        except OSError:
            continue
        if int(parent) == pid and state != "Z":
            found.append((int(entry), command))
    return found


def _gone(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_benchmarks_keep_the_interrupt_rules(tmp_path):
    """The benchmarks start like the commands: SIGTERM ends their children and removes what
    they stage (exit 143), SIGINT is "error: interrupted" (130), not a traceback, and an
    unknown name is one line (exit 2)."""
    from test_interrupts import start

    env = dict(os.environ, PYTHONPATH=REPO)
    bench = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "bench_export_time.py"),
        "--variants",
        "convmixer_768_32",
    ]
    proc = start(bench, tmp_path)
    deadline, child = time.time() + 120, None
    while child is None and time.time() < deadline and proc.poll() is None:
        child = next((pid for pid, command in _children(proc.pid) if "--one" in command), None)
        time.sleep(0.05)
    assert child is not None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (
        proc.returncode == 128 + signal.SIGTERM
        and err.strip().splitlines()[-1] == "error: interrupted"
    )
    deadline = time.time() + 5
    while not _gone(child) and time.time() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the benchmark's child goes on without it"
    table = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "paper_table.py"),
        "--quick",
        "--networks",
        "ResNet-152",
        "--output-dir",
        str(tmp_path / "table"),
    ]
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = start(table, tmp_path)
        deadline = time.time() + 60
        while (
            not [e for e in os.listdir(tmp_path) if e.startswith(".table.partial-")]
            and time.time() < deadline
        ):
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1] == "error: interrupted"
        assert not [e for e in os.listdir(tmp_path) if "table" in e], os.listdir(tmp_path)
    for script, option in (
        ("bench_export_time.py", "--variants"),
        ("paper_table.py", "--networks"),
        ("bench_export.py", "--variants"),
        ("parity_table.py", "--variants"),
    ):
        done = subprocess.run(
            [sys.executable, os.path.join(REPO, "benchmarks", script), option, "nope"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "invalid choice: 'nope'" in lines[0], (
            script,
            lines,
        )
