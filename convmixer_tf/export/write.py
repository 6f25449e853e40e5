"""Writing and checking the files of a run, one format after the other: what the main
process and each worker process (`export.parallel`) do with their formats."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from convmixer_tf.export.base import ExportError, ExportJob
from convmixer_tf.export.verify import Check, Runner, compare


@dataclasses.dataclass(frozen=True)
class Checks:
    """What every file of a run is checked on: held-out images in the files' input space,
    Keras' outputs (logits) on them, and how many single-image calls time each file."""

    held_out: np.ndarray
    reference: np.ndarray
    latency_runs: int = 10


def write_and_check(formats, job: ExportJob, directory, checks: Checks, log) -> dict:
    """{name: (row, its runner)} of each format, written and checked in turn (its latency
    is timed by the caller, when nothing else runs); ExportError at the first that fails."""
    done = {}
    for fmt in formats:
        path = os.path.join(os.fspath(directory), fmt.filename)
        log(f"  {fmt.name} -> {fmt.filename}")
        start = time.perf_counter()
        fmt.write(job, path)
        runner = Runner(path, name=fmt.name)
        check = Check(runner, job.model, checks.held_out, fmt.tolerance, job.info, job.shared)
        row = compare(check, checks.reference)
        if row.get("problem"):
            raise ExportError(f"{fmt.name}: {fmt.filename}: {row['problem']}")
        if not row["passed"]:
            raise ExportError(
                f"{fmt.name}: {fmt.filename} differs from Keras by {row['max_abs']:.3g} (allowed "
                f"{row['allowed']:.3g}: tolerance {row['tolerance']} x the largest output, at least 1)"
            )
        done[fmt.name] = (dict(row, seconds=time.perf_counter() - start), runner)
    return done
