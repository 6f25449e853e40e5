"""Writing the formats of one run side by side: each group of formats that share work
(`ExportFormat.group`: a traced graph, a converted file), the first aside, is written and
checked by a worker process of its own while this process writes the first group. A worker
is the standard library's `ProcessPoolExecutor` with the spawn context (a fresh interpreter);
the job and the formats travel pickled (`ExportJob.__reduce__`; a format's callables are
module-level functions and classes, which pickle by name), the rows come back as its result, and the
files are timed afterwards, here. It costs the start of a Python with TensorFlow (a few
seconds) and earns a core: conversions and checks are mostly single-threaded.

A worker has no deadline. One that dies is noticed at once (`BrokenProcessPool`), and its
failure is raised here; what is left is a conversion that hangs inside a library, which
hangs alike in one process (`--processes 1`), and SIGINT stops either.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading

from convmixer_tf import interrupts
from convmixer_tf.export.base import ExportError
from convmixer_tf.export.verify import Runner, write_and_check

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


def write_in_processes(groups: dict, job, directory, held_out, reference, *, log) -> dict:
    """{format name: (row, runner)} of every format of `groups` ({group: [ExportFormat]}),
    checked on `held_out` against Keras' outputs `reference`: the first group written here,
    each other one by a worker process at the same time."""
    first, *others = groups.values()
    for fmt in [fmt for formats in others for fmt in formats]:
        log(f"  {fmt.name} -> {fmt.filename} (in a process of its own)")
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(_worker(formats, job, directory, held_out, reference))
            for formats in others
        ]
        done = write_and_check(first, job, directory, held_out, reference, log=log)
        for result in workers:
            done.update(result())
    return done  # every worker has ended: the files are timed on a quiet machine


@contextlib.contextmanager
def _worker(formats, *job):
    """A process of its own writing `formats`; yields `result()`, its {name: (row, runner)}.
    It is killed on SIGINT / SIGTERM and when the block fails, and waited for."""
    before = set(multiprocessing.active_children())
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=spawn, initializer=_end_with_parent
    ) as pool:
        future = pool.submit(_write, formats, *job)
        (process,) = set(multiprocessing.active_children()) - before

        def kill():
            process.kill()
            process.join(5)

        with interrupts.on_interrupt(kill):
            try:
                yield lambda: _result(future, pool, process, formats)
            except BaseException:
                kill()
                raise


def _result(future, pool, process, formats) -> dict:
    """A worker's rows, each with a runner of its file here; its death raised as what it is."""
    try:
        rows = future.result()
    except concurrent.futures.process.BrokenProcessPool as err:
        pool.shutdown()  # it is reaped: its exit code is known
        if err.__cause__ is not None or not process.exitcode or process.exitcode > 0:
            raise
        code = -process.exitcode
        name = signal.Signals(code).name if code in signal.valid_signals() else str(code)
        raise ExportError(
            f"the process writing {', '.join(fmt.name for fmt in formats)} was killed by signal {code} ({name}), "
            "most likely by the kernel for want of memory: pass --processes 1 (one file after "
            "the other, in less memory) or write fewer formats at once"
        ) from None
    return {fmt.name: (rows[fmt.name], Runner(rows[fmt.name]["path"], fmt=fmt)) for fmt in formats}


def _write(formats, job, directory, held_out, reference) -> dict:
    """A worker's task: {name: row} of its formats, written and checked in turn. The formats
    come pickled, as the job does: a format the registry does not list (a test's) is
    written by a worker all the same."""
    try:
        done = write_and_check(
            formats, job, directory, held_out, reference, log=lambda message: None
        )
    finally:
        job.close()
    return {name: row for name, (row, _) in done.items()}


def _end_with_parent() -> None:
    """A worker's start: it ends when the process that started it ends, even by kill -9
    (which no handler sees), so that no orphan goes on computing. The parent holds a pipe
    to it open until then (`multiprocessing.parent_process().sentinel`)."""
    sentinel = multiprocessing.parent_process().sentinel
    threading.Thread(target=_exit_when_ready, args=(sentinel,), daemon=True).start()


def _exit_when_ready(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
