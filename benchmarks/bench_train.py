"""Training throughput (images/s): our Keras ConvMixer on the JAX backend against timm in
PyTorch, same device, same batch, same run; or, with --multi-process, one process with two
devices against two processes with one device each (JAX's distributed runtime).

    python benchmarks/bench_train.py                      # convmixer_768_32, 224 px, bf16
    python benchmarks/bench_train.py --batch-size 64 --steps 30
    python benchmarks/bench_train.py --image-size 64 --batch-size 8 --steps 3   # a CPU smoke run
    python benchmarks/bench_train.py --multi-process --model convmixer_256_8 --image-size 32 --batch-size 32 \
        --precision fp32 --steps 20                       # on the CPU: 2 devices in 1 process vs 2 processes

Ours: convmixer_tf.train (AdamW, global-norm clipping 1.0, label-smoothed cross-entropy,
the float32 head) compiled with XLA on the Keras JAX backend, mixed_bfloat16.
Peer: timm's model, torch.autocast(bfloat16), channels_last, torch.optim.AdamW with
clip_grad_norm_(1.0). Both train on one fixed random batch that stays on the device, so
the input pipeline is not measured. Each side runs in its own process; steps after
--warmup are timed with the device synchronised.

Target (issue): ours / timm >= 1.0 on a GPU. Measured on one H200: 1.36 (768/32, batch 64),
1.51 (batch 128), 1.40 (1536/20, batch 64); see README.

--multi-process runs the same training step (global batch --batch-size) three ways, each
in fresh processes on the CPU: one process with two XLA devices (DataParallel), two
processes with one device each on localhost (keras.distribution.initialize, gloo
collectives), each pinned to a core of its own, and, for reference, one process with one
device pinned to one core on half the batch (what each of the two processes computes).
Step time of two processes minus that reference is what the processes spend on each
other (gradient and BatchNorm all-reduces through gloo, and waiting), measured this way
rather than with JAX's profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from convmixer_tf import cli
from convmixer_tf.config import list_variants

DESCRIPTION, _, EPILOG = __doc__.partition("\n\n")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keras_jax(args, distribute="none", process_id=None, coordinator=None, batch=None):
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, REPO)
    import keras
    import numpy as np

    from convmixer_tf.model import build_variant, rebuild
    from convmixer_tf.train import TrainConfig
    from convmixer_tf.train.distribute import distribution, start_processes
    from convmixer_tf.train.optim import compile_model

    config = TrainConfig(
        variant=args.model,
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        schedule="constant",
        jit_compile=True,
        distribute=distribute,
        coordinator=coordinator,
        num_processes=2 if coordinator else None,
        process_id=process_id,
    )
    shard = start_processes(config)  # before anything touches JAX
    import jax

    scope, devices, _ = distribution(distribute)
    source = build_variant(args.model, input_shape=(args.image_size, args.image_size, 3))
    with scope:
        model = rebuild(
            source,
            raw_rgb=True,
            dtype_policy="mixed_bfloat16" if args.precision == "bf16" else "float32",
        )
        compile_model(model, config, steps_per_epoch=args.steps + args.warmup)
    classes = model.output_shape[-1]
    rng = np.random.default_rng(shard.index)
    local = (batch or args.batch_size) // shard.count  # this process's share of the global batch
    x = rng.uniform(0, 255, (local, args.image_size, args.image_size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, local), classes).astype("float32")
    if distribute == "none":
        x, y = jax.device_put(x), jax.device_put(y)
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model.train_on_batch(x, y)[0]  # host floats: the step has finished
    seconds = time.perf_counter() - start
    return {
        "who": "ours: Keras (JAX backend, XLA)",
        "device": str(jax.devices()[0].device_kind),
        "devices": devices,
        "processes": shard.count,
        "step_ms": seconds / args.steps * 1e3,
        "images_per_second": local * shard.count * args.steps / seconds,
        "loss": float(loss),
    }


def timm_torch(args):
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (
        timm.create_model(args.model, pretrained=False)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.005)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen) * 255).to(
        device
    )
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype, enabled=args.precision == "bf16"):
            loss = loss_fn(model((x - mean) / std), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "who": "timm (PyTorch eager, AMP, channels_last)",
        "device": name,
        "images_per_second": args.batch_size * args.steps / seconds,
        "loss": float(loss),
    }


def main(argv=None):
    parser = cli.ArgumentParser(
        prog="benchmarks/bench_train.py", description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument(
        "--model", default="convmixer_768_32", choices=list_variants(), metavar="NAME"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--multi-process",
        action="store_true",
        help="one process with two devices against two processes with one device each (CPU)",
    )
    parser.add_argument(
        "--only",
        choices=("ours", "timm", "ours-1x2", "ours-2x1", "ours-half"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return cli.run_command(lambda log, console: _run(args, argv), verbose=True)


def _run(args, argv) -> int:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.only:
        runs = {
            "ours": lambda: keras_jax(args),
            "timm": lambda: timm_torch(args),
            "ours-1x2": lambda: keras_jax(args, "data-parallel"),
            "ours-2x1": lambda: keras_jax(args, "multi-process", args.process_id, args.coordinator),
            "ours-half": lambda: keras_jax(args, batch=args.batch_size // 2),
        }
        result = runs[args.only]()
        print("RESULT " + json.dumps(result))
        return 0
    if args.multi_process:
        return multi_process(args, argv if argv is not None else sys.argv[1:])

    results = []
    for side in ("timm", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", side] + (
            argv if argv is not None else sys.argv[1:]
        )
        run = cli.run_child(cmd, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        line = next((row for row in run.stdout.splitlines() if row.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            print(f"{side} failed:\n{run.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT ") :]))
    print(
        f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    for r in results:
        print(f"  {r['who']:<45} {r['images_per_second']:10.1f} images/s   on {r['device']}")
    print(
        f"  ratio ours / timm: {results[1]['images_per_second'] / results[0]['images_per_second']:.2f}"
    )
    return 0


def _result(run, side):
    line = next((row for row in run.stdout.splitlines() if row.startswith("RESULT ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"{side} failed:\n{run.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def multi_process(args, argv):
    import socket

    argv = [a for a in argv if a != "--multi-process"]
    me = [sys.executable, os.path.abspath(__file__)] + argv
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    results = {}
    for side, devices, pin in (("ours-1x2", 2, []), ("ours-half", 1, ["--cpu", "0"])):
        run = cli.run_child(
            me + ["--only", side] + pin,
            env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
        )
        results[side] = _result(run, side)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                cli.child(
                    me
                    + [
                        "--only",
                        "ours-2x1",
                        "--process-id",
                        str(i),
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--cpu",
                        str(i % os.cpu_count()),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                )
            )
            for i in range(2)
        ]
        outs = [p.communicate() for p in procs]
    results["ours-2x1"] = _result(
        subprocess.CompletedProcess(procs[0].args, procs[0].returncode, *outs[0]), "2x1"
    )
    print(
        f"{args.model}, {args.image_size} px, global batch {args.batch_size}, {args.precision}, "
        f"{args.steps} timed steps after {args.warmup}; CPU, {os.cpu_count()} cores"
    )
    for side, label in (
        ("ours-1x2", "1 process x 2 devices"),
        ("ours-2x1", "2 processes x 1 device, a core each"),
        ("ours-half", "1 process x 1 device, 1 core, half the batch (a process's work)"),
    ):
        r = results[side]
        print(f"  {label:<64} {r['images_per_second']:8.1f} images/s  {r['step_ms']:8.1f} ms/step")
    between = results["ours-2x1"]["step_ms"] - results["ours-half"]["step_ms"]
    print(
        f"  ratio 2 processes / 1 process (images/s): "
        f"{results['ours-2x1']['images_per_second'] / results['ours-1x2']['images_per_second']:.2f}"
    )
    print(
        f"  time the two processes spend on each other per step (2 x 1 minus half batch): {between:.1f} ms "
        f"({between / results['ours-2x1']['step_ms']:.0%} of a step)"
    )
    return 0


if __name__ == "__main__":
    cli.exit(main())
