"""Writing the formats of one run in several processes: each group of formats that share
work (`ExportFormat.group`: a traced graph, a converted file) is written and checked by a
process of its own, side by side, and the files are timed afterwards, one process after
the other, so that no latency figure is taken while another process computes.

A worker is `python -m convmixer_tf.export.parallel SPEC.json`: a fresh interpreter (it
imports nothing of the caller's script), which reports on its stdout in lines that start
with MARK. It costs the start of a Python with TensorFlow (a few seconds) and earns a
core: conversions and checks are mostly single-threaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from convmixer_tf import contract, interrupts, outputs
from convmixer_tf.errors import BadInput
from convmixer_tf.export.base import ExportError, ExportJob
from convmixer_tf.export.write import Checks, write_and_check

MARK = "@convmixer-export "
ERRORS = {1: ExportError, 2: BadInput}  # a worker's failure raised again here, by its exit code


# Peak memory of a run written side by side (benchmarks/bench_export_time.py, the summed
# memory of its processes): 11.1 GiB for convmixer_768_32 (85 MB of weights), 19.1 GiB for
# convmixer_1536_20 (207 MB); about 5.5 GiB plus 66 times the weights' bytes.
MEMORY = (5.5 * 2**30, 66)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_allows(model) -> bool:
    """True when the memory available now (Linux's MemAvailable) covers a run of `model`
    written side by side, with a tenth to spare; False where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            available = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError):
        return False
    return available >= 1.1 * (MEMORY[0] + MEMORY[1] * 4 * model.count_params())


def time_allowed(job: ExportJob, formats) -> float:
    """Seconds a worker may take for one phase (writing and checking `formats`, or timing
    them) before it is taken to hang: ten times an estimate from the work, the weights'
    size and the calibration images (bench_export_time: 189 s for every file of
    convmixer_1536_20's 207 MB of weights on 2 cores; calibration about a second an image)."""
    megabytes = 4 * job.model.count_params() / 1e6
    seconds = len(formats) * (60 + 2 * megabytes)
    if any(fmt.calibrated for fmt in formats) and job.calibration is not None:
        seconds += len(job.calibration) * (1 + 0.05 * megabytes)
    return 10 * seconds


def write_in_processes(groups: dict, job: ExportJob, directory, checks: Checks, log) -> dict:
    """{format name: row} of every format of `groups` ({group: [ExportFormat]}): the first
    group written here, each other one by a worker process."""
    spec = _spec(job, directory, checks)
    with contextlib.ExitStack() as stack:
        workers = []
        for name, formats in list(groups.items())[1:]:
            path = os.path.join(job.scratch(), f"{name}.json")
            with open(path, "w") as f:
                json.dump(dict(spec, names=[fmt.name for fmt in formats]), f)
            command = [sys.executable, "-m", "convmixer_tf.export.parallel", path]
            process = subprocess.Popen(
                command, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            worker = Worker(process, [fmt.name for fmt in formats], time_allowed(job, formats))
            workers.append(stack.enter_context(worker.running()))
        here = write_and_check(list(groups.values())[0], job, directory, checks, log)
        rows = {name: row for name, (row, _) in here.items()}
        for worker in workers:
            rows.update(worker.receive("written", log))
        for row, runner in here.values():
            row["latency_ms"] = runner.latency_ms(checks.held_out, checks.latency_runs)
        for worker in workers:  # one at a time: a quiet machine for each figure
            worker.start_timing()
            rows.update(worker.receive("timed", log))
            worker.process.wait()  # its exit (TensorFlow's teardown) is over before the next one times
    return rows


class Worker:
    """A worker process writing `names`, read line by line by a thread of its own, so that
    a phase that runs past `seconds` (a hang) is noticed."""

    def __init__(self, process, names, seconds: float):
        self.process = process
        self.names = names
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @contextlib.contextmanager
    def running(self):
        """Killed on an interrupt, or when this process fails meanwhile; else waited for
        (it ends once it has reported its timings)."""
        with self.process, interrupts.on_interrupt(self._kill):
            try:
                yield self
            except BaseException:
                self._kill()
                raise

    def _kill(self):
        self.process.kill()
        self.process.wait(5)

    def start_timing(self):
        self.deadline = time.monotonic() + self.seconds
        self.process.stdin.write("time\n")
        self.process.stdin.flush()

    def receive(self, kind, log) -> dict:
        """Its `kind` report (logging what it says meanwhile); its failure, its death and its
        silence past the deadline are raised here."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                self._kill()
                raise ExportError(
                    f"the process writing {', '.join(self.names)} did not finish within "
                    f"{self.seconds:.0f} s (ten times what the model's size and the formats "
                    "should take) and was stopped"
                ) from None
            if line is None:
                break
            if not line.startswith(MARK):
                continue  # what a library printed on its own
            what, payload = json.loads(line[len(MARK) :])
            if what == "log":
                log(payload)
            elif what == "error":
                code, message = payload
                raise ERRORS.get(code, RuntimeError)(message)
            elif what == kind:
                return payload
        raise self._ended()

    def _ended(self) -> Exception:
        code = self.process.wait()
        if code >= 0:
            return RuntimeError(f"an export worker ended without a report (exit code {code})")
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return ExportError(
            f"the process writing {', '.join(self.names)} was killed by signal {-code} ({name}), "
            "most likely by the kernel for want of memory: pass --processes 1 (one file after "
            "the other, in less memory) or write fewer formats at once"
        )


def _spec(job: ExportJob, directory, checks) -> dict:
    """What a worker needs to rebuild the job: the export model as a .keras file, its
    facts, the images and Keras' outputs as one .npz, the options."""
    model_path = os.path.join(job.scratch(), "export.keras")
    job.model.save(model_path)
    arrays = os.path.join(job.scratch(), "checks.npz")
    np.savez(
        arrays,
        held_out=checks.held_out,
        reference=checks.reference,
        calibration=job.calibration if job.calibration is not None else np.zeros((0,)),
    )
    return {
        "model": model_path,
        "info": job.info.to_dict(),
        "arrays": arrays,
        "directory": os.fspath(directory),
        "nchw": job.nchw,
        "opset": job.opset,
        "tflite_output": job.tflite_output,
        "source": job.calibration_source,
        "latency_runs": checks.latency_runs,
        "parent": os.getpid(),
    }


def _report(what, payload) -> None:
    print(MARK + json.dumps([what, payload], default=outputs.jsonable), flush=True)


def _end_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that started it ends, even by
    kill -9 (which no handler sees), so no orphan goes on computing. Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before that took effect
        os._exit(1)


def main(spec_path) -> int:
    """A worker: writes and checks its formats, reports, waits for its turn, times its
    files, reports again."""
    from convmixer_tf.errors import exit_code, one_line
    from convmixer_tf.export import registry

    with open(spec_path) as f:
        spec = json.load(f)
    _end_with_parent(spec["parent"])
    try:
        import keras

        info = contract.ModelInfo.from_dict(spec["info"])
        model = contract.attach(keras.saving.load_model(spec["model"]), info)
        # each array read once (an .npz reads on every access)
        arrays = dict(np.load(spec["arrays"]))
        calibration = arrays["calibration"] if arrays["calibration"].ndim == 4 else None
        job = ExportJob(
            model,
            info,
            nchw=spec["nchw"],
            opset=spec["opset"],
            tflite_output=spec["tflite_output"],
            calibration=calibration,
            calibration_source=spec["source"],
        )
        checks = Checks(arrays["held_out"], arrays["reference"], spec["latency_runs"])
        formats = [registry.get(name) for name in spec["names"]]
        done = write_and_check(
            formats, job, spec["directory"], checks, lambda message: _report("log", message)
        )
    except BaseException as err:  # noqa: BLE001 - reported to the process that waits for it
        code = exit_code(err)
        _report("error", [code, one_line(err, named=code not in ERRORS)])
        return code
    _report("written", {name: row for name, (row, _) in done.items()})
    job.close()
    sys.stdin.readline()  # its turn to time
    for row, runner in done.values():
        row["latency_ms"] = runner.latency_ms(checks.held_out, checks.latency_runs)
    _report("timed", {name: row for name, (row, _) in done.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
