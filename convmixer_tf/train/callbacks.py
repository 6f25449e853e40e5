"""What a run watches while it trains: a loss that stops being finite, its progress and
throughput, and history.csv read back (an epoch trained twice keeps its last row)."""

from __future__ import annotations

import csv
import math
import os
import time

import keras

from convmixer_tf.errors import CheckFailed


class TrainingError(CheckFailed):
    """The run started but cannot finish (diverged, ...): exit status 1."""


class StopOnNaN(keras.callbacks.Callback):
    """Aborts at the first non-finite loss, before the epoch ends, so no checkpoint or
    backup ever holds the diverged weights."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            checkpoint = os.path.join(self.folder, "checkpoint.weights.h5")
            kept = (
                f"the weights of the last finished epoch are in {checkpoint}"
                if os.path.exists(checkpoint)
                else "no epoch finished"
            )
            raise TrainingError(
                f"loss became {float(loss)} at epoch {self._epoch + 1}, step {batch + 1}: training "
                f"stopped (lower --lr, keep --clip-norm, or use --precision fp32); {kept}"
            )


class Progress(keras.callbacks.Callback):
    """Counts the epochs trained in this session and their time (every epoch is
    steps_per_epoch whole batches: the throughput in metrics.json) and reports epochs to
    `log` when Keras' own progress bar is off."""

    def __init__(self, log, verbose):
        super().__init__()
        self.log = log
        self.verbose = verbose
        self.seconds = 0.0
        self.epochs = 0
        self._start = None  # of the epoch being trained

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.epochs += 1
        self.seconds += elapsed
        if self.verbose == 0:
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in sorted((logs or {}).items()) if k != "learning_rate"
            )
            self.log(f"epoch {epoch + 1}/{self.params.get('epochs')}: {shown} ({elapsed:.1f} s)")


def read_history(path) -> list:
    """history.csv as a list of per-epoch dicts; an epoch trained twice (a kill between
    its row and its backup) keeps its last row."""
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = {
                k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""
            }
    return [rows[e] for e in sorted(rows)]
