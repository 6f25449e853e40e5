"""benchmarks/paper_table.py in its quick mode: every network of the paper's table measured
in the runtimes that can run it, parameters as timm itself counts them."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convmixer_gmacs(name, size=224):
    """Multiply-adds of a ConvMixer at `size` px, counted by hand: the patch embedding, each
    block's depthwise and pointwise convolutions, the head (BatchNorm and activations aside,
    as PyTorch's FLOP counter leaves them)."""
    from convmixer_tf import get_variant

    c = get_variant(name).config
    positions = (size // c.patch_size) ** 2
    blocks = c.depth * positions * c.dim * (c.kernel_size ** 2 + c.dim)
    return (positions * c.dim * 3 * c.patch_size ** 2 + blocks + c.dim * c.num_classes) / 1e9


@pytest.mark.slow
def test_the_paper_table_in_quick_mode(tmp_path):
    import timm

    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "paper_table.py"), "--quick",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.load(open(tmp_path / "paper_table.json"))
    table = open(tmp_path / "paper_table.md").read()
    assert result["quick"] and "Quick run" in table
    rows = result["rows"]
    assert [row["network"] for row in rows] == ["ConvMixer-1536/20", "ConvMixer-768/32", "ResNet-152", "DeiT-B",
                                                "ResMLP-B24/8"]
    for row in rows:
        count = sum(p.numel() for p in timm.create_model(row["timm"], pretrained=False).parameters())
        assert row["params"] == count, row["network"]
        assert f"| {row['network']} | " in table and f" | {count / 1e6:.1f} | " in table
        assert row["gmacs"] > 0
        measured = {name for name, figures in row["runtimes"].items() if "throughput" in figures}
        if row["timm"].startswith("convmixer"):
            assert row["params_keras"] == count  # our Keras model: the same network
            assert row["gmacs"] == pytest.approx(convmixer_gmacs(row["timm"]), rel=1e-6)
            assert measured == {"PyTorch eager", "ONNX fp32", "TFLite fp32", "TFLite int8", "ONNX int8"}
        else:
            assert measured == {"PyTorch eager", "ONNX fp32"}
            assert "no converter here" in row["runtimes"]["TFLite fp32"]["not_measured"]
        for name in measured:
            assert row["runtimes"][name]["throughput"] > 0 and row["runtimes"][name]["latency_ms"] > 0
    base = rows[2]["runtimes"]
    for ratio in result["ratios"]:
        row = next(r for r in rows if r["network"] == ratio["convmixer"])
        if ratio["runtime"] == "PyTorch eager":
            expected = base["PyTorch eager"]["throughput"] / row["runtimes"]["PyTorch eager"]["throughput"]
            assert ratio["measured"] == pytest.approx(expected)
            assert ratio["paper"] == pytest.approx(rows[2]["paper"]["throughput"] / row["paper"]["throughput"])


def test_benchmarks_never_write_over_a_users_files(tmp_path):
    """--output-dir of the table and --json of the export-time benchmark follow the commands'
    rule: a user's file there is refused at once (exit 2, one line), before any measuring,
    and left as it was."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paper_table.md").write_text("my notes")
    mine = tmp_path / "figures.json"
    mine.write_text('{"mine": true}')
    for script, option, target in (("paper_table.py", "--output-dir", notes), ("bench_export_time.py", "--json", mine)):
        done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), option, str(target)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stdout == "", (script, done.stderr)
    assert (notes / "paper_table.md").read_text() == "my notes" and os.listdir(notes) == ["paper_table.md"]
    assert mine.read_text() == '{"mine": true}' and sorted(os.listdir(tmp_path)) == ["figures.json", "notes"]
