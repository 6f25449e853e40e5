"""Where a run is written: its folder, new or an unfinished run of the same settings to
resume, or with --force a staging folder that replaces an earlier run once the new one has
finished (any failure or interruption leaves the earlier run intact). Every process of a
run checks the same folder (it must reach it: one host, or a shared file system)."""

from __future__ import annotations

import contextlib
import json
import os

from convmixer_tf import outputs
from convmixer_tf.errors import BadInput
from convmixer_tf.staging import Staging
from convmixer_tf.train.distribute import broadcast_text, sync
from convmixer_tf.train.recipe import TrainConfig

RUN = outputs.Output(
    "convmixer_tf.train",
    "config.json",
    lambda settings: isinstance(settings, dict) and {"epochs", "batch_size"} <= set(settings),
    (
        *outputs.exactly(
            "config.json",
            "history.csv",
            "metrics.json",
            "model.keras",
            "checkpoint.weights.h5",
            "backup/",
            "backup/training_metadata.json",
            "backup/latest.weights.h5",
        ),
        r"backup/process\d+/training_metadata\.json",
        r"backup/process\d+/latest\.weights\.h5",
        # TensorBoard's: events.out.tfevents.TIME.HOST.PID.N.v2
        r"logs/train/events\.out\.tfevents\.\d+\..+\.v2",
        r"logs/validation/events\.out\.tfevents\.\d+\..+\.v2",
    ),
)


@contextlib.contextmanager
def run_folder(config: TrainConfig, shard, log):
    """Yields (the folder the run writes into, whether it resumes an unfinished run there).

    A new or unfinished run of the same settings is written (or resumed) in its output
    folder. With --force, a run over an earlier output (of this command, holding none of
    the run's inputs; anything else is refused, exit 2) trains in a staging folder that
    replaces the earlier output once the run has finished.
    """
    out = os.path.abspath(config.output)
    inputs = [config.init, config.data_dir, config.tfds_data_dir, config.manual_dir]
    staging = None
    if config.force and os.path.lexists(out):
        outputs.check_replaceable(out, RUN, True, inputs)
        staging, folder = _staged(out, config, shard, inputs)
        resumed = False
    else:
        outputs.check_inputs_outside(out, inputs)
        folder, resumed = out, _existing_run(out, config.settings(), log)
        sync(shard, "output checked")
        if shard.index == 0 and not os.path.exists(os.path.join(out, "config.json")):
            os.makedirs(out, exist_ok=True)
            outputs.write_json_atomic(os.path.join(out, "config.json"), config.settings())
    try:
        sync(shard, "output ready")
        yield folder, resumed
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
    staging = Staging(out, RUN, True, inputs)
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
