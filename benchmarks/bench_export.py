"""Inference latency of every exported format against the PyTorch peers, in one run.

Batch 1, 224 px, 2 threads, median of --runs calls, same machine, same process. The
formats take turns in rounds of a few consecutive calls, so that drift of this shared
machine hits all of them alike; the first call of each turn is not timed, because
onnxruntime's and PyTorch's worker threads keep spinning for a while after a call and
would otherwise be charged to whichever runtime comes next (one call each in turn had
our TFLite file at 172 ms where back-to-back calls took 150 ms).

Peers: timm in PyTorch eager; onnxruntime on torch.onnx.export of the timm model;
litert-torch's TFLite file of the timm model, run by the same LiteRT interpreter as ours
(litert-torch lives in its own environment: `bash benchmarks/setup_litert_torch.sh`
makes .venv-litert-torch, which is used when present, or pass --litert-torch-python).
Ours: SavedModel (TF), TFLite float32 (as emitted: large depthwise kernels tiled; and
the plain graph for comparison), TFLite dynamic-range and int8, ONNX on onnxruntime.
Weights are random (seeded, random BatchNorm statistics): speed does not depend on
them, int8 top-1 agreement does (see the note printed).

    python benchmarks/bench_export.py [--variants convmixer_768_32 convmixer_1536_20] [--runs 20]
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time

from convmixer_tf import cli
from convmixer_tf.config import list_variants

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DESCRIPTION, _, EPILOG = __doc__.partition("\n\n")
THREADS = 2
# The TFLite files also timed through MediaPipe's ImageClassifier (and alone on one thread,
# as MediaPipe's Python API runs them): the ones an app would ship.
APP_ROWS = ("TFLite float32 (ours)", "TFLite int8")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITERT_TORCH_VENV_PYTHON = os.path.join(REPO, ".venv-litert-torch", "bin", "python")


def cpu_description() -> str:
    """CPU model and the vector extensions that decide XNNPACK's and onnxruntime's kernels."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [
        name
        for name in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")
        if name in flags
    ]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"


def turns_median_ms(calls, runs, turn=4):
    """Median ms of `runs` timed calls of each callable. The callables take turns of
    `turn` timed calls, each turn opened by one untimed call."""
    times = {name: [] for name in calls}
    while min(len(t) for t in times.values()) < runs:
        for name, fn in calls.items():
            fn()  # absorbs what the previous runtime left running
            for _ in range(min(turn, runs - len(times[name]))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def litert_torch_file(net, name, tmp, python, seconds=None):
    """litert-torch's .tflite of `net` (same weights), written by its own environment; with
    `seconds` (a dict), its conversion's seconds, timed inside that process, go in it."""
    import torch

    weights = os.path.join(tmp, f"{name}_timm.pth")
    torch.save(net.state_dict(), weights)
    out = os.path.join(tmp, f"{name}_litert_torch.tflite")
    done = cli.run_child(
        [
            python,
            os.path.join(REPO, "benchmarks", "litert_torch_peer.py"),
            "--variant",
            name,
            "--state-dict",
            weights,
            "--output",
            out,
        ]
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"litert-torch conversion failed: {last[:120]}")
    if seconds is not None:
        seconds["conversion"] = float(done.stdout.split("conversion seconds:")[1].split()[0])
    return out


def bench_variant(name, runs, tmp, calibration_count, litert_torch_python=None):
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    import convmixer_tf
    from convmixer_tf import export as exporters
    from convmixer_tf.export import mobile
    from convmixer_tf.export.calibration import synthetic_images
    from convmixer_tf.export.onnx_int8 import export_onnx_int8
    from convmixer_tf.export.scores import as_output
    from convmixer_tf.facts import facts_of

    mediapipe_installed = importlib.util.find_spec("mediapipe") is not None
    from weights_converter.convert import convert_state_dict
    from weights_converter.demo import randomize_batchnorm

    torch.set_num_threads(THREADS)
    net = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=0).eval()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    model = convmixer_tf.rebuild(convert_state_dict(sd).model, input_shape=(224, 224, 3))
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    rows, calls = [], {}

    def eager():
        with torch.no_grad():
            net(x_nchw)

    calls["timm PyTorch eager"] = eager
    rows.append(("peer", "timm PyTorch eager", "", None))
    onnx_path = os.path.join(tmp, f"{name}_torch.onnx")
    try:
        torch.onnx.export(
            net,
            (x_nchw,),
            onnx_path,
            opset_version=17,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        feed = {"images": x_nchw.numpy()}
        calls["onnxruntime on torch.onnx.export"] = lambda: session.run(None, feed)
        rows.append(("peer", "onnxruntime on torch.onnx.export", "", os.path.getsize(onnx_path)))
    except Exception as err:  # report, do not hide
        failed = f": failed ({type(err).__name__}: {str(err)[:80]})"
        rows.append(("peer", "onnxruntime on torch.onnx.export", failed, None))
    if litert_torch_python:
        try:
            peer = litert_torch_file(net, name, tmp, litert_torch_python)
            runner = exporters.Runner(peer, THREADS)  # its input is NCHW, as the timm model's
            nchw = x_nchw.numpy()
            with torch.no_grad():
                diff = float(abs(runner(nchw) - net(x_nchw).numpy()).max())
            calls["litert-torch TFLite"] = lambda: runner(nchw)
            rows.append(
                (
                    "peer",
                    "litert-torch TFLite",
                    f" (max|diff| vs timm {diff:.1e})",
                    os.path.getsize(peer),
                )
            )
        except Exception as err:  # report, do not hide
            rows.append(("peer", "litert-torch TFLite", f": failed ({str(err)[:90]})", None))
    else:
        rows.append(
            (
                "peer",
                "litert-torch TFLite",
                ": not installed (bash benchmarks/setup_litert_torch.sh)",
                None,
            )
        )

    # Our files as the command lines write them: raw 0-255 RGB in (mean/std inside the
    # graph), TFLite files ending in a softmax, with metadata.
    app = convmixer_tf.rebuild(
        model, preprocessing=(convmixer_tf.config.IMAGENET_MEAN, convmixer_tf.config.IMAGENET_STD)
    )
    held_out = synthetic_images(16, 224, seed=99)
    reference = app.predict(held_out, verbose=0)
    calibration = synthetic_images(calibration_count, 224, seed=1)
    raw = held_out[:1]
    image = mobile.frame(mobile.pixels(raw[0], facts_of(app))) if mediapipe_installed else None

    def ours(label, path):
        runner = exporters.Runner(path, THREADS)
        out = runner(held_out)
        expected = as_output(facts_of(app), reference, runner.output)
        agreement = float(np.mean(out.argmax(1) == expected.argmax(1)))
        max_abs = float(np.abs(out - expected).max())
        calls[label] = lambda: runner(raw)
        rows.append(
            (
                "ours",
                label,
                f" ({runner.output}, max|diff| {max_abs:.1e}, top-1 agree {agreement:.0%})",
                _size(path),
            )
        )
        # what an app pays: MediaPipe's whole task graph
        if label in APP_ROWS and image is not None:
            classifier = classifiers.enter_context(mobile.open_classifier(path, expected.shape[1]))
            calls[label + ", MediaPipe classify()"] = lambda: classifier.classify(image)
            rows.append(("ours", label + ", MediaPipe classify()", "", None))
            # MediaPipe's Python API sets no thread count: its own inference runs on one.
            single = exporters.Runner(path, threads=1)
            calls[label + ", 1 thread"] = lambda: single(raw)
            rows.append(("ours", label + ", 1 thread", "", None))

    # The int8 ONNX file first, while nothing else holds memory: onnxruntime's calibration
    # runs a copy of the model that returns every intermediate tensor.
    int8_onnx = export_onnx_int8(app, os.path.join(tmp, f"{name}_int8.onnx"), calibration)
    gc.collect()
    classifiers = contextlib.ExitStack()
    sm = exporters.export_saved_model(app, os.path.join(tmp, f"{name}_sm"))
    ours("SavedModel (TF)", sm)
    ours(
        "TFLite float32, plain graph",
        exporters.export_tflite(
            app, os.path.join(tmp, f"{name}_plain.tflite"), tiled_depthwise=False
        ),
    )
    ours("TFLite float32 (ours)", exporters.export_tflite(app, os.path.join(tmp, f"{name}.tflite")))
    ours(
        "TFLite dynamic-range",
        exporters.export_tflite(
            app, os.path.join(tmp, f"{name}_dyn.tflite"), quantization="dynamic"
        ),
    )
    ours(
        "TFLite int8",
        exporters.export_tflite(
            app,
            os.path.join(tmp, f"{name}_int8.tflite"),
            quantization="int8",
            representative_data=lambda: (c[None] for c in calibration),
        ),
    )
    ours("ONNX on onnxruntime", exporters.export_onnx(app, os.path.join(tmp, f"{name}.onnx")))
    ours("ONNX int8 on onnxruntime", int8_onnx)
    with classifiers:
        medians = turns_median_ms(calls, runs)
    profiles = {"ONNX int8 on onnxruntime": onnx_op_profile(int8_onnx, raw)}
    if os.path.exists(onnx_path):
        profiles["onnxruntime on torch.onnx.export"] = onnx_op_profile(onnx_path, x_nchw.numpy())
    return [(side, key, note, medians.get(key), size) for side, key, note, size in rows], profiles


def onnx_op_profile(path, image, runs=10, top=8) -> str:
    """onnxruntime's own profile (SessionOptions.enable_profiling): kernel ms per run by op type."""
    import collections
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "convmixer-ort-profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image}
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    by_op = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    total = sum(by_op.values())
    shown = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return f"{total:.1f} ms of kernels: " + ", ".join(f"{op} {ms:.1f}" for op, ms in shown)


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="benchmarks/bench_export.py", description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["convmixer_768_32", "convmixer_1536_20"],
        choices=list_variants(),
        metavar="NAME",
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calibration-count", type=int, default=16)
    parser.add_argument(
        "--litert-torch-python",
        default=None,
        help="python of an environment with litert-torch, timm and torch "
        f"(default: {os.path.relpath(LITERT_TORCH_VENV_PYTHON, REPO)} when present)",
    )
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args), verbose=True)


def _run(args) -> int:
    if args.litert_torch_python is None and os.path.exists(LITERT_TORCH_VENV_PYTHON):
        args.litert_torch_python = LITERT_TORCH_VENV_PYTHON
    # a process each: 1536/20 alone peaks at 23 GiB, which the next must not inherit
    if len(args.variants) > 1:
        for name in args.variants:
            child = [
                sys.executable,
                os.path.abspath(__file__),
                "--variants",
                name,
                "--runs",
                str(args.runs),
                "--calibration-count",
                str(args.calibration_count),
            ]
            if args.litert_torch_python:
                child += ["--litert-torch-python", args.litert_torch_python]
            with cli.child(child) as process:
                if process.wait() != 0:
                    return 1
        return 0

    import tensorflow as tf

    import weights_converter  # noqa: F401  (keeps triton out before TensorFlow loads)

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            rows, profile = bench_variant(
                name, args.runs, tmp, args.calibration_count, args.litert_torch_python
            )
            by = {key: ms for _, key, _, ms, _ in rows}
            print(
                f"\n{name}: batch 1, 224 px, {THREADS} threads, median of {args.runs}; {cpu_description()}"
            )
            for side, key, note, ms, size in rows:
                ms_text = f"{ms:9.1f} ms" if ms is not None else "      n/a"
                size_text = f"{size / 1e6:8.1f} MB" if size else ""
                print(f"  {side:<5} {key + note:<70} {ms_text} {size_text}")
            ort_ms = by.get("onnxruntime on torch.onnx.export")
            tfl, tfl_plain = by.get("TFLite float32 (ours)"), by.get("TFLite float32, plain graph")
            int8, onnx_ours = by.get("TFLite int8"), by.get("ONNX on onnxruntime")
            sizes = {key: size for _, key, _, _, size in rows}
            print("  ratios:")
            onnx_int8 = by.get("ONNX int8 on onnxruntime")
            if ort_ms:
                print(
                    f"    our TFLite float32 / onnxruntime(torch.onnx) = {tfl / ort_ms:.2f} (target <= 1.0)"
                )
                print(
                    f"    our ONNX / onnxruntime(torch.onnx)           = {onnx_ours / ort_ms:.2f} (target <= 1.0)"
                )
                print(
                    f"    onnxruntime(torch.onnx) / our int8 ONNX      = {ort_ms / onnx_int8:.2f} "
                    "(speed-up; target >= 2.5 on convmixer_768_32)"
                )
                if ort_ms / onnx_int8 < 2.0:  # where the time goes, from onnxruntime's profiler
                    for key in ("onnxruntime on torch.onnx.export", "ONNX int8 on onnxruntime"):
                        print(f"      profile, {key}: {profile.get(key, 'n/a')}")
            print(
                f"    int8 ONNX file / float ONNX file              = "
                f"{sizes['ONNX int8 on onnxruntime'] / sizes['ONNX on onnxruntime']:.1%} (target <= 27%)"
            )
            if by.get("litert-torch TFLite"):
                print(
                    f"    our TFLite float32 / litert-torch TFLite      = {tfl / by['litert-torch TFLite']:.2f} "
                    "(target <= 0.7)"
                )
            print(
                f"    TFLite plain graph / ours                     = {tfl_plain / tfl:.2f} "
                "(speed-up of the tiled depthwise)"
            )
            print(
                f"    TFLite float32 / int8                         = {tfl / int8:.2f} (target >= 2.5)"
            )
            print(
                f"    int8 file / float32 file                      = "
                f"{sizes['TFLite int8'] / sizes['TFLite float32 (ours)']:.1%} (target <= 27%)"
            )
            for key in APP_ROWS:
                app_ms, one = by.get(f"{key}, MediaPipe classify()"), by.get(f"{key}, 1 thread")
                if app_ms:
                    print(
                        f"    MediaPipe classify() / bare LiteRT, {key:<21} = {app_ms / by[key]:.2f} with 2 threads, "
                        f"{app_ms / one:.2f} with 1 ({app_ms - one:+.1f} ms)"
                    )
        print(
            "\nnote: int8 top-1 agreement above is on synthetic images with random weights, whose logits are "
            "nearly tied; it says little about agreement on real images with trained weights."
        )
    return 0


if __name__ == "__main__":
    cli.exit(main())
