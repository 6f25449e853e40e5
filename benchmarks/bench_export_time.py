"""Seconds to write and check every export format, and where they go.

For each variant, a ConvMixer with random weights and randomised BatchNorm statistics
(timm's network, converted: the same weights litert-torch gets), saved as .keras, then:

- the whole export a user waits for, the command line with `--formats all
  --calibration-count 8` (as `make demo`): every file written, checked against Keras,
  checked in MediaPipe and timed; its wall seconds and the peak memory of its processes;
- the same files written one after the other in one process (`processes=1`): the
  seconds of each format (writing and checking it; the first file of a shared graph
  pays for tracing it) and of the fixed costs around them;
- litert-torch's float32 conversion of the timm model, in its own environment
  (`bash benchmarks/setup_litert_torch.sh`), where set up: the conversion alone, timed
  inside that process.

The headline is "ours, every file" / "litert-torch, float32 only".

    python benchmarks/bench_export_time.py [--variants convmixer_768_32 convmixer_1536_20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_export import LITERT_TORCH_VENV_PYTHON, cpu_description, litert_torch_file  # noqa: E402

from convmixer_tf import cli, outputs  # noqa: E402
from convmixer_tf.config import list_variants  # noqa: E402

TARGET = 7.0  # ours, every file / litert-torch, float32 only


def peak_memory(process, interval=0.2) -> dict:
    """Samples the summed resident memory of `process` and its children until it ends;
    returns {"peak_gb": ...}, filled in by a thread."""
    import psutil

    found = {"peak_gb": 0.0}

    def sample():
        root = psutil.Process(process.pid)
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):  # a child that ended while being read
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                found["peak_gb"] = max(found["peak_gb"], total / 2**30)
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()
    return found


def whole_export(model_path, out, calibration_count):
    """Wall seconds and peak memory of the command line writing every format."""
    command = [
        sys.executable,
        "-m",
        "convmixer_tf.export",
        "--model",
        model_path,
        "--formats",
        "all",
        "--calibration-count",
        str(calibration_count),
        "--output",
        out,
        "--quiet",
    ]
    start = time.perf_counter()
    with cli.child(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        memory = peak_memory(process)
        printed, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"export failed: {errors.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, memory["peak_gb"], printed


def serial_stages(model_path, calibration_count) -> list:
    """(stage, seconds) of every format written one after the other in this process."""
    import convmixer_tf
    from convmixer_tf import export

    stages, start = [], time.perf_counter()
    model = convmixer_tf.load_model(model_path)
    stages.append(("load the .keras file", time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        options = export.ExportOptions(
            formats=("all",), calibration_count=calibration_count, processes=1
        )
        rows = export.export_formats(model, out, options)
        total = time.perf_counter() - start
    stages += [(f"{row['format']}: write and check", row["seconds"]) for row in rows]
    timed = sum(row["seconds"] for row in rows)
    stages.append(("model for export, reference outputs, latency timing", total - timed))
    return stages


def bench_variant(name, calibration_count, litert_python) -> dict:
    import timm

    import convmixer_tf
    from weights_converter.convert import convert_state_dict
    from weights_converter.demo import randomize_batchnorm

    net = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "model.keras")
        convmixer_tf.save_model(
            convert_state_dict({k: v.numpy() for k, v in net.state_dict().items()}).model,
            model_path,
        )
        wall, peak_gb, printed = whole_export(
            model_path, os.path.join(tmp, "out"), calibration_count
        )
        result = {
            "variant": name,
            "whole_export_s": wall,
            "peak_memory_gb": peak_gb,
            "report": printed,
            "stages": serial_stages(model_path, calibration_count),
            "litert_torch_s": None,
        }
        if litert_python:
            try:
                seconds = {}
                litert_torch_file(net, name, tmp, litert_python, seconds)
                result["litert_torch_s"] = seconds["conversion"]
            except RuntimeError as err:
                result["litert_torch_error"] = str(err)
    return result


def show(result, calibration_count):
    name, wall = result["variant"], result["whole_export_s"]
    print(f"\n{name}: every format, --calibration-count {calibration_count}; {cpu_description()}")
    print(
        f"  whole export (command line, files written side by side): {wall:7.1f} s, "
        f"peak memory {result['peak_memory_gb']:.1f} GiB"
    )
    print("  one after the other, in one process:")
    for stage, seconds in result["stages"]:
        print(f"    {stage:<55} {seconds:7.1f} s")
    print(f"    {'total':<55} {sum(s for _, s in result['stages']):7.1f} s")
    peer = result["litert_torch_s"]
    if peer:
        print(f"  peer: litert-torch, float32 TFLite only (conversion alone): {peer:7.1f} s")
        print(
            f"  ours, every file / litert-torch, float32 only = {wall / peer:.1f}x (target <= {TARGET:.0f}x)"
        )
    else:
        missing = "not set up (bash benchmarks/setup_litert_torch.sh)"
        print("  peer: litert-torch", result.get("litert_torch_error", missing))


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="benchmarks/bench_export_time.py",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["convmixer_768_32", "convmixer_1536_20"],
        choices=list_variants(),
        metavar="NAME",
        help=f"any of: {', '.join(list_variants())}",
    )
    parser.add_argument("--calibration-count", type=cli.positive(), default=8, help="as make demo")
    parser.add_argument(
        "--litert-torch-python",
        default=None,
        help="python of an environment with litert-torch, timm and torch "
        f"(default: {os.path.relpath(LITERT_TORCH_VENV_PYTHON, REPO)} when present)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    # a child: one variant, JSON out
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.litert_torch_python is None and os.path.exists(LITERT_TORCH_VENV_PYTHON):
        args.litert_torch_python = LITERT_TORCH_VENV_PYTHON
    return cli.run_command(lambda log, console: _run(args), verbose=True)


def _run(args) -> int:
    # an earlier file of this benchmark may be replaced, nothing else (exit 2 at once)
    if args.json:
        outputs.check_file(args.json, is_ours, option="--json")
    if args.one:
        import weights_converter  # noqa: F401  (keeps triton out before TensorFlow loads)

        print(
            json.dumps(
                bench_variant(args.variants[0], args.calibration_count, args.litert_torch_python)
            )
        )
        return 0
    results = []
    for name in args.variants:  # a process each, so that no variant inherits another's memory
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            "--variants",
            name,
            "--calibration-count",
            str(args.calibration_count),
        ]
        if args.litert_torch_python:
            child += ["--litert-torch-python", args.litert_torch_python]
        done = cli.run_child(child)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        show(results[-1], args.calibration_count)
    if args.json:
        earlier = outputs.check_file(args.json, is_ours, option="--json")
        outputs.write_json_atomic(args.json, results, exclusive=not earlier)
    return 0


def is_ours(data) -> bool:
    """An earlier --json file of this benchmark."""
    return isinstance(data, list) and all(
        isinstance(r, dict) and "whole_export_s" in r for r in data
    )


if __name__ == "__main__":
    cli.exit(main())
