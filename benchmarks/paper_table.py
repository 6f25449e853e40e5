"""The table of "Patches Are All You Need?" measured again, on this machine, per runtime.

The paper's table lists five networks with the throughput each reached on its GPU in
PyTorch at batch 64. This measures the same five on the machine it runs on, in the
runtimes a deployed model goes through:

- PyTorch eager (timm) for every network;
- ONNX fp32 on onnxruntime for every network: ours for ConvMixer (`export_onnx`, NCHW),
  `torch.onnx.export` of timm's model for the others;
- our TFLite fp32 and int8 (LiteRT with XNNPACK) and our int8 ONNX for ConvMixer. No
  converter of this package makes TFLite or int8 files of the others: not measured.

ConvMixer is timm's network with its weights converted into our Keras model (the same
weights in every runtime); the others are timm's. Weights are random (seeded): speed
does not depend on them, and accuracy is not measured. Parameters are counted at 224 px
(timm's own count, and our Keras model's trainable weights for ConvMixer), GMACs with
PyTorch's FLOP counter at 224 px, batch 1 (one multiply-add per two FLOPs). Throughput
is images per second at batch 64 (the paper's measure; a TFLite file takes one image
per call, so it gets 64 calls), latency the median of single-image calls. Every runtime
gets the cores this process may use. The headline figures are ratios of two networks in
one runtime, measured in the same run: ResNet-152's throughput over ConvMixer's, beside
the paper's GPU ratio.

    python benchmarks/paper_table.py                 # 224 px, batch 64 (tens of minutes on 2 cores)
    python benchmarks/paper_table.py --quick         # 32 px, batch 4, 2 runs: a smoke run, not figures
    python benchmarks/paper_table.py --output-dir out   # also writes paper_table.md and .json

--output-dir follows the commands' rule (docs/commands.md): a new folder, or one holding
an earlier table and nothing else, unchanged (its RECORD), which is replaced once the new
table is written; anything else is refused at once (exit 2), before the measuring starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

from convmixer_tf import cli, outputs, staging
from convmixer_tf.export.parallel import cores  # the cores this process may use

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclasses.dataclass(frozen=True)
class Network:
    """A row of the paper's table (what it reports) and the timm model it is."""

    name: str
    timm_name: str
    patch: object
    kernel: object
    params_m: float
    throughput: float
    activation: str
    epochs: int
    top1: float

    @property
    def convmixer(self) -> bool:
        return self.timm_name.startswith("convmixer")


# Table 1 of the paper, as printed ("-": none).
PAPER = (
    Network("ConvMixer-1536/20", "convmixer_1536_20", 7, 9, 51.6, 89, "GELU", 150, 81.37),
    Network("ConvMixer-768/32", "convmixer_768_32", 7, 7, 21.1, 203, "ReLU", 300, 80.16),
    Network("ResNet-152", "resnet152", "-", 3, 60.2, 872, "ReLU", 150, 79.64),
    Network("DeiT-B", "deit_base_patch16_224", 16, "-", 86, 703, "GELU", 300, 81.8),
    Network("ResMLP-B24/8", "resmlp_big_24_224", 8, "-", 129, 140, "GELU", 400, 81.0),
)
BASELINE = "ResNet-152"  # the ratios: its throughput over each ConvMixer's
RUNTIMES = ("PyTorch eager", "ONNX fp32", "TFLite fp32", "TFLite int8", "ONNX int8")
FASTEST = "fastest of each (int8 measured for ConvMixer only)"
NOT_OURS = "no converter here makes this file of a network that is not a ConvMixer"


@dataclasses.dataclass(frozen=True)
class Settings:
    size: int = 224
    batch: int = 64
    runs: int = 3
    calibration: int = 8

    @classmethod
    def quick(cls) -> "Settings":
        return cls(size=32, batch=4, runs=2, calibration=2)


def timed(call, runs: int) -> float:
    """Median seconds of `runs` calls of `call`, after one untimed call."""
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run_batch, single, settings: Settings) -> dict:
    """Latency (ms, one image) and throughput (images/s at the batch) of one runtime.
    `run_batch(n)` returns a callable computing n images, `single` one image."""
    one = timed(lambda: single(), settings.runs)
    batch = timed(run_batch(settings.batch), settings.runs)
    return {"latency_ms": one * 1e3, "throughput": settings.batch / batch}


def timm_network(net: Network, size: int):
    import timm

    options = {} if net.convmixer or net.timm_name == "resnet152" else {"img_size": size}
    return timm.create_model(net.timm_name, pretrained=False, **options).eval()


def count(net: Network) -> dict:
    """Parameters (timm's own count, at 224 px) and GMACs at 224 px, batch 1."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = timm_network(net, 224)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, 224, 224))
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "gmacs": counter.get_total_flops() / 2e9,
    }


def torch_runtimes(model, images, settings: Settings, tmp: str, onnx: bool) -> dict:
    """PyTorch eager, and onnxruntime on torch.onnx.export's file when `onnx`."""
    import torch

    x = torch.from_numpy(images)

    def eager(n):
        def call():
            with torch.no_grad():
                model(x[:n])

        return call

    found = {"PyTorch eager": measure(eager, eager(1), settings)}
    if onnx:
        path = os.path.join(tmp, "torch.onnx")
        torch.onnx.export(
            model,
            (x[:1],),
            path,
            opset_version=17,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
        found["ONNX fp32"] = measure(*onnx_calls(path, images), settings)
    return found


def onnx_calls(path, images):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda n: lambda: session.run(None, {name: images[:n]})), lambda: session.run(
        None, {name: images[:1]}
    )


def our_runtimes(timm_model, images, settings: Settings, tmp: str) -> dict:
    """Our files of timm's ConvMixer (its weights in our Keras model): ONNX fp32 and
    int8 on onnxruntime, TFLite fp32 and int8 on LiteRT; the Keras model's size."""
    import numpy as np

    import convmixer_tf
    from convmixer_tf import export
    from convmixer_tf.export.calibration import synthetic_images
    from convmixer_tf.export.onnx_int8 import export_onnx_int8
    from convmixer_tf.export.tflite import TFLiteRunner
    from weights_converter.convert import convert_state_dict

    model = convert_state_dict({k: v.numpy() for k, v in timm_model.state_dict().items()}).model
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    model = convmixer_tf.rebuild(model, input_shape=(settings.size, settings.size, 3))
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    preprocessing = convmixer_tf.facts_of(model).preprocessing
    calibration = preprocessing.normalize(
        synthetic_images(settings.calibration, settings.size, seed=1)
    )
    found = {}
    onnx_path = export.export_onnx(model, os.path.join(tmp, "ours.onnx"), nchw=True)
    found["ONNX fp32"] = measure(*onnx_calls(onnx_path, images), settings)
    int8_path = export_onnx_int8(
        model,
        os.path.join(tmp, "ours_int8.onnx"),
        calibration.astype(np.float32),
        nchw=True,
        float_path=onnx_path,
    )
    found["ONNX int8"] = measure(*onnx_calls(int8_path, images), settings)
    for runtime, quantization in (("TFLite fp32", None), ("TFLite int8", "int8")):
        path = export.export_tflite(
            model,
            os.path.join(tmp, f"ours_{runtime[-4:]}.tflite"),
            quantization=quantization,
            representative_data=lambda: (im[None] for im in calibration.astype(np.float32)),
        )
        runner = TFLiteRunner(path, threads=cores())

        def batch(n, runner=runner):
            # one image per call, as the file takes
            return lambda: [runner(nhwc[i : i + 1]) for i in range(n)]

        found[runtime] = measure(batch, batch(1), settings)
    return {"runtimes": found, "params_keras": params}


def measure_network(net: Network, settings: Settings, log) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(cores())
    row = {
        "network": net.name,
        "timm": net.timm_name,
        "paper": dataclasses.asdict(net),
        **count(net),
    }
    log(f"{net.name}: {row['params'] / 1e6:.1f} M parameters, {row['gmacs']:.2f} GMACs")
    model = timm_network(net, settings.size)
    images = (
        np.random.default_rng(0)
        .normal(size=(settings.batch, 3, settings.size, settings.size))
        .astype(np.float32)
    )
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = torch_runtimes(model, images, settings, tmp, onnx=not net.convmixer)
        if net.convmixer:
            ours = our_runtimes(model, images, settings, tmp)
            runtimes.update(ours["runtimes"])
            row["params_keras"] = ours["params_keras"]
    row["runtimes"] = {name: runtimes.get(name, {"not_measured": NOT_OURS}) for name in RUNTIMES}
    for name, figures in row["runtimes"].items():
        if "throughput" in figures:
            log(f"  {name:<14} {figures['throughput']:8.1f} img/s  {figures['latency_ms']:8.1f} ms")
    return row


def ratios(rows) -> list:
    """(ConvMixer, runtime, ResNet-152 throughput / ConvMixer's, the paper's GPU ratio)."""
    by = {row["network"]: row for row in rows}
    base = by.get(BASELINE)
    found = []
    for row in rows:
        if base is None or not row["timm"].startswith("convmixer"):
            continue
        paper = base["paper"]["throughput"] / row["paper"]["throughput"]
        for runtime in RUNTIMES:
            ours, theirs = (
                row["runtimes"][runtime].get("throughput"),
                base["runtimes"][runtime].get("throughput"),
            )
            if ours and theirs:
                found.append((row["network"], runtime, theirs / ours, paper))
        best_base = max(f["throughput"] for f in base["runtimes"].values() if "throughput" in f)
        best = max(f["throughput"] for f in row["runtimes"].values() if "throughput" in f)
        found.append((row["network"], FASTEST, best_base / best, paper))
    return found


def markdown(result) -> str:
    rows, settings = result["rows"], result["settings"]
    out = [
        f"Measured on {result['machine']}, {settings['size']} px, throughput at batch "
        f"{settings['batch']}, median of {settings['runs']} runs; random weights."
    ]
    if result["quick"]:
        out.append(
            "Quick run (tiny inputs, few runs): the figures check the benchmark, they say nothing of speed."
        )
    out += [
        "",
        "| network | patch | kernel | params (M), paper | params (M), timm | params (M), ours | GMACs "
        "| throughput (img/s), paper's GPU | act | epochs | ImageNet top-1, paper |",
        "|---" * 11 + "|",
    ]
    for row in rows:
        p = row["paper"]
        ours = f"{row['params_keras'] / 1e6:.1f}" if "params_keras" in row else "-"
        out.append(
            f"| {row['network']} | {p['patch']} | {p['kernel']} | {p['params_m']} | {row['params'] / 1e6:.1f} "
            f"| {ours} | {row['gmacs']:.1f} | {p['throughput']} | {p['activation']} | {p['epochs']} "
            f"| {p['top1']} |"
        )
    for key, title, form in (
        ("throughput", f"Throughput (img/s, batch {settings['batch']})", "{:.1f}"),
        ("latency_ms", "Latency (ms, one image)", "{:.1f}"),
    ):
        out += [
            "",
            f"{title} on this machine:",
            "",
            "| network | " + " | ".join(RUNTIMES) + " |",
            "|---" * (len(RUNTIMES) + 1) + "|",
        ]
        for row in rows:
            cells = [
                form.format(row["runtimes"][r][key])
                if key in row["runtimes"][r]
                else "not measured"
                for r in RUNTIMES
            ]
            out.append(f"| {row['network']} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"{BASELINE}'s throughput over ConvMixer's, in the same runtime (the paper, on its GPU in "
        "PyTorch: the last column):",
        "",
        "| ConvMixer | runtime | measured here | paper |",
        "|---|---|---|---|",
    ]
    for name, runtime, measured, paper in ratios(rows):
        out.append(f"| {name} | {runtime} | {measured:.1f}x | {paper:.1f}x |")
    out += ["", '"not measured": ' + NOT_OURS + "."]
    return "\n".join(out)


def main(argv=None) -> int:
    description, _, epilog = __doc__.partition("\n\n")
    parser = cli.ArgumentParser(
        prog="benchmarks/paper_table.py", description=description, epilog=epilog
    )
    parser.add_argument(
        "--quick", action="store_true", help="32 px, batch 4, 2 runs, 2 calibration images"
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        default=[net.name for net in PAPER],
        metavar="NAME",
        choices=[net.name for net in PAPER],
        help="rows of the table to measure (default: all five)",
    )
    parser.add_argument(
        "--runs",
        type=cli.positive(),
        default=None,
        help="timed runs per figure (default 3; quick 2)",
    )
    parser.add_argument(
        "--output-dir", default=None, help="write paper_table.md and paper_table.json there"
    )
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args, log), verbose=True)


def _run(args, log) -> int:
    settings = Settings.quick() if args.quick else Settings()
    settings = dataclasses.replace(settings, runs=args.runs) if args.runs else settings

    from bench_export import cpu_description

    import weights_converter  # noqa: F401  (keeps triton out before TensorFlow loads)

    with contextlib.ExitStack() as stack:
        table = None
        if args.output_dir:  # checked before the measuring starts
            table = stack.enter_context(_table_folder(args.output_dir))
        rows = [measure_network(net, settings, log) for net in PAPER if net.name in args.networks]
        result = {
            "machine": cpu_description(),
            "cores": cores(),
            "quick": args.quick,
            "settings": dataclasses.asdict(settings),
            "rows": rows,
            "ratios": [
                dict(zip(("convmixer", "runtime", "measured", "paper"), r)) for r in ratios(rows)
            ],
        }
        text = markdown(result)
        print(text)
        if table:
            outputs.write_atomic(os.path.join(table.path, "paper_table.md"), text + "\n")
            outputs.write_json_atomic(os.path.join(table.path, "paper_table.json"), result)
    return 0


def _table_folder(path):
    """--output-dir, staged: a new folder, or an earlier table (its RECORD lists
    paper_table.json, and nothing in it changed) to replace; anything else is exit 2."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(f"{path}/paper_table.json"):
        raise outputs.OutputExistsError(
            f"--output-dir {path} exists and holds no earlier table; choose another --output-dir"
        )
    return staging.staged(path, force=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.exit(main())
