"""Training throughput (images/s): our Keras ConvMixer on the JAX backend against timm in
PyTorch, same device, same batch, same run.

    python benchmarks/bench_train.py                      # convmixer_768_32, 224 px, bf16
    python benchmarks/bench_train.py --batch-size 64 --steps 30
    python benchmarks/bench_train.py --image-size 64 --batch-size 8 --steps 3   # a CPU smoke run

Ours: convmixer_tf.training (AdamW, global-norm clipping 1.0, label-smoothed cross-entropy,
the float32 head) compiled with XLA on the Keras JAX backend, mixed_bfloat16.
Peer: timm's model, torch.autocast(bfloat16), channels_last, torch.optim.AdamW with
clip_grad_norm_(1.0). Both train on one fixed random batch that stays on the device, so
the input pipeline is not measured. Each side runs in its own process; steps after
--warmup are timed with the device synchronised.

Target (issue): ours / timm >= 1.0 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keras_jax(args):
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, REPO)
    import jax
    import keras
    import numpy as np

    from convmixer_tf import create_model
    from convmixer_tf.training import TrainConfig, compile_model, training_copy

    keras.config.set_dtype_policy("mixed_bfloat16" if args.precision == "bf16" else "float32")
    source = create_model(args.model, input_shape=(args.image_size, args.image_size, 3))
    model = training_copy(source, image_size=args.image_size)
    config = TrainConfig(variant=args.model, epochs=1, batch_size=args.batch_size, lr=1e-3, schedule="constant",
                         jit_compile=True)
    compile_model(model, config, steps_per_epoch=args.steps + args.warmup)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32"))
    y = jax.device_put(keras.utils.to_categorical(rng.integers(0, 1000, args.batch_size), 1000).astype("float32"))
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model.train_on_batch(x, y)[0]  # host floats: the step has finished
    seconds = time.perf_counter() - start
    return {"who": "ours: Keras (JAX backend, XLA)", "device": str(jax.devices()[0].device_kind),
            "images_per_second": args.batch_size * args.steps / seconds, "loss": float(loss)}


def timm_torch(args):
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.model, pretrained=False).to(device).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.005)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen) * 255).to(device)
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
    return {"who": "timm (PyTorch eager, AMP, channels_last)", "device": name,
            "images_per_second": args.batch_size * args.steps / seconds, "loss": float(loss)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convmixer_768_32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--only", choices=("ours", "timm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        result = keras_jax(args) if args.only == "ours" else timm_torch(args)
        print("RESULT " + json.dumps(result))
        return 0

    results = []
    for side in ("timm", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", side] + (argv if argv is not None else sys.argv[1:])
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        line = next((row for row in run.stdout.splitlines() if row.startswith("RESULT ")), None)
        if run.returncode != 0 or line is None:
            print(f"{side} failed:\n{run.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} timed steps after {args.warmup}")
    for r in results:
        print(f"  {r['who']:<45} {r['images_per_second']:10.1f} images/s   on {r['device']}")
    print(f"  ratio ours / timm: {results[1]['images_per_second'] / results[0]['images_per_second']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
