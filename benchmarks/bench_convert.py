"""Conversion speed and memory: a convmixer_1536_20 .pth file -> model.keras.

Measures what the converter itself costs, excluding parity and exports: reading the
checkpoint, mapping, building and filling the Keras model, saving model.keras.
Memory is the peak resident set during that work above the resident set after the
imports (TensorFlow + torch), read from /proc (VmHWM, reset before the run).

    python benchmarks/bench_convert.py [--variant convmixer_1536_20] [--repeat 3]

Target (issue): <= 15 s wall, peak extra memory <= 3x the checkpoint size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from convmixer_tf import cli
from convmixer_tf.config import list_variants

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DESCRIPTION, _, EPILOG = __doc__.partition("\n\n")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_once(ckpt, out_dir):
    """Runs in a fresh process: returns (seconds, peak extra MB, rss after imports MB)."""
    import keras  # noqa: F401
    import torch  # noqa: F401

    import weights_converter  # noqa: F401  (imports torch-safe first)
    from weights_converter.convert import convert_file

    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    conversion = convert_file(ckpt)
    conversion.release()  # as the converter does once parity has run
    conversion.model.save(os.path.join(out_dir, "model.keras"))
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return seconds, (peak - baseline) / 1024, baseline / 1024


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="benchmarks/bench_convert.py", description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument(
        "--variant", default="convmixer_1536_20", choices=list_variants(), metavar="NAME"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args), verbose=True)


def _run(args) -> int:
    if args.child:
        seconds, extra_mb, base_mb = measure_once(*args.child)
        print(f"{seconds:.3f} {extra_mb:.1f} {base_mb:.1f}")
        return 0

    import torch

    import weights_converter  # noqa: F401
    from weights_converter.demo import randomize_batchnorm

    with tempfile.TemporaryDirectory() as tmp:
        import timm

        net = randomize_batchnorm(timm.create_model(args.variant, pretrained=False))
        ckpt = os.path.join(tmp, f"{args.variant}.pth")
        torch.save(net.state_dict(), ckpt)
        del net
        size_mb = os.path.getsize(ckpt) / 2**20
        print(f"checkpoint: {args.variant}, {size_mb:.1f} MiB ({ckpt})")
        runs = []
        for i in range(args.repeat):
            out = os.path.join(tmp, f"out{i}")
            os.makedirs(out)
            proc = cli.run_child([sys.executable, __file__, "--child", ckpt, out])
            if proc.returncode:
                print(proc.stderr[-3000:])
                return 1
            seconds, extra, base = map(float, proc.stdout.split()[-3:])
            runs.append((seconds, extra))
            print(
                f"run {i + 1}: {seconds:.2f} s, peak extra memory {extra:.0f} MiB "
                f"({extra / size_mb:.2f}x checkpoint), RSS after imports {base:.0f} MiB"
            )
        med_s = statistics.median(r[0] for r in runs)
        med_mem = statistics.median(r[1] for r in runs)
        print(
            f"median: {med_s:.2f} s (target <= 15 s), peak extra memory {med_mem:.0f} MiB = "
            f"{med_mem / size_mb:.2f}x checkpoint (target <= 3x)"
        )
    return 0


if __name__ == "__main__":
    cli.exit(main())
