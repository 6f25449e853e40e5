"""Where a run is written: its folder, new or an unfinished run of the same settings to
resume, or with --force a staging folder that replaces an earlier run once the new one has
finished (any failure or interruption leaves the earlier run intact). Every process of a
run checks the same folder (it must reach it: one host, or a shared file system). Its
RECORD says what the run wrote there, kept true as the run goes (`RunRecord`)."""

from __future__ import annotations

import contextlib
import json
import os

import keras

from convmixer_tf import interrupts, outputs
from convmixer_tf.errors import BadInput
from convmixer_tf.staging import Staging
from convmixer_tf.train.distribute import broadcast_text, sync
from convmixer_tf.train.recipe import TrainConfig

RUN_FILES = ("config.json", "history.csv", "metrics.json", "model.keras", "checkpoint.weights.h5")


class RunRecord(keras.callbacks.Callback):
    """Keeps the RECORD of a run folder true while the run writes it, over hours: at the end
    of each epoch (the last callback, after every save of it), on SIGINT or SIGTERM, and
    when the run ends. It lists what the run writes (its files, backup/, TensorBoard's
    event files, a killed run's too) and what the RECORD listed when it began (a resumed
    run), never another file of the user's that the folder holds."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        try:
            self.listed = set(outputs.read_record(folder) or ())
        except outputs.OutputExistsError:  # damaged since: this run's own files only
            self.listed = set()

    def ours(self, path) -> bool:
        top, _, rest = path.partition("/")
        if path in self.listed or path in RUN_FILES or top == "backup":
            return True
        # TensorBoard's event files: logs/<board>/events.out.tfevents.TIME.HOST.PID.N.v2
        board, _, name = rest.partition("/")
        event = "/" not in name and name.startswith("events.out.tfevents.") and name.endswith(".v2")
        return top == "logs" and board in ("train", "validation") and event

    def update(self) -> None:
        outputs.write_record(self.folder, self.ours)

    def on_epoch_end(self, epoch, logs=None):
        self.update()


class FlushedTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard, its event files flushed at the end of each epoch: the RECORD,
    written next, then holds them as they stay after a kill."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():  # Keras keeps its writers private
            writer.flush()


@contextlib.contextmanager
def run_folder(config: TrainConfig, shard, log):
    """Yields (the folder the run writes into, whether it resumes an unfinished run there,
    its `RunRecord` in process 0 of a run written in place, else None).

    A new or unfinished run of the same settings is written (or resumed) in its output
    folder. With --force, a run over an earlier output (nothing in it but what its RECORD
    lists, unchanged, and none of the run's inputs; anything else is refused, exit 2)
    trains in a staging folder that replaces the earlier output once the run has finished.
    """
    out = os.path.abspath(config.output)
    inputs = [config.init, config.data_dir, config.tfds_data_dir, config.manual_dir]
    staging = None
    if config.force and os.path.lexists(out):
        staging, folder = _staged(out, config, shard, inputs)
        resumed = False
    else:
        outputs.check_inputs_outside(out, inputs)
        folder, resumed = out, _existing_run(out, config.settings(), log)
        sync(shard, "output checked")
        if shard.index == 0 and not os.path.exists(os.path.join(out, "config.json")):
            os.makedirs(out, exist_ok=True)
            outputs.write_json_atomic(os.path.join(out, "config.json"), config.settings())
    record = RunRecord(out) if folder == out and shard.index == 0 else None
    try:
        sync(shard, "output ready")
        with contextlib.ExitStack() as recorded:
            if record is not None:  # true at the end, on SIGINT or SIGTERM, after a failure
                recorded.enter_context(interrupts.on_interrupt(record.update))
                recorded.callback(record.update)
            yield folder, resumed, record
            sync(shard, "run saved")
        if staging is not None:
            staging.commit()
    except BaseException:
        if staging is not None:
            staging.discard()
        raise


def _staged(out, config: TrainConfig, shard, inputs):
    """(the staging folder's Staging, in process 0; its path, in every process)."""
    if shard.index != 0:
        folder = broadcast_text("", shard)
        if not folder:
            raise BadInput(f"process 0 could not prepare the output {out}")
        return None, folder
    staging = Staging(out, True, inputs)
    try:
        staging.open()
    finally:  # the others wait for the path either way
        folder = broadcast_text(staging.path or "", shard)
    outputs.write_json_atomic(os.path.join(staging.path, "config.json"), config.settings())
    return staging, folder


def _existing_run(out, settings, log) -> bool:
    """For an output that may exist: True to resume it, False to start it, or a
    BadInput saying why neither."""
    if not os.path.lexists(out):
        return False
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise BadInput(
            f"{out} already holds a finished run; use --force to start over or another --output"
        )
    if not os.path.exists(os.path.join(out, "config.json")):
        if not os.path.isdir(out) or os.listdir(out):
            raise BadInput(f"output {out} exists and is not a training run; use another --output")
        return False
    try:
        with open(os.path.join(out, "config.json")) as f:
            stored = json.load(f)
    except ValueError:  # not JSON: not a run's settings
        stored = None
    if not isinstance(stored, dict):
        raise BadInput(
            f"{out}/config.json is not a run's settings; use --force or another --output"
        )
    before = TrainConfig.with_defaults(stored)  # a field added since does not stop it from resuming
    changed = sorted(k for k in settings if json.dumps(settings[k]) != json.dumps(before.get(k)))
    if changed:
        raise BadInput(
            f"{out} holds a run with other settings ({', '.join(changed)}); "
            "use --force to start over or another --output"
        )
    resumed = os.path.isdir(os.path.join(out, "backup"))
    if resumed:
        log(f"resuming the interrupted run in {out}")
    return resumed
