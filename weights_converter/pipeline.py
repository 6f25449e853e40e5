"""The whole job, in one direction: read the checkpoint, map it into Keras, check it
against the PyTorch network, save it, export it.

Everything is written into a staging folder beside the output (made first, so an
unwritable output fails before any work) and moved into place at the very end, so a
failure at any step leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Optional

from convmixer_tf import outputs
from convmixer_tf.export import ExportOptions, export_formats, registry
from convmixer_tf.staging import staged
from weights_converter import hub
from weights_converter.convert import convert_file
from weights_converter.parity import DEFAULT_TOLERANCE, prove

REPORT = "report.json"
MODEL = "model.keras"
CARD = "README.md"
SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def default_output_dir(checkpoint_path) -> str:
    """`dir/name.pth.tar` -> `dir/name_keras`; `hf-hub:owner/name` -> `./name_keras`."""
    if hub.is_hub_id(checkpoint_path):
        return os.path.abspath(hub.parse(checkpoint_path)[0].split("/")[1] + "_keras")
    path = os.path.abspath(os.fspath(checkpoint_path))
    base = os.path.basename(path)
    base = next((base[: -len(s)] for s in SUFFIXES if base.endswith(s)), base)
    return os.path.join(os.path.dirname(path), f"{base}_keras")


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What to convert, and how: the one object the command line builds and passes down.

    Attributes:
        checkpoint: a checkpoint file, or `hf-hub:OWNER/NAME[@REVISION]`.
        output: the output folder (default: next to the checkpoint, NAME_keras).
        variant: the released variant the checkpoint must be (it sets the activation).
        activation: "gelu" or "relu" (default: the matched variant's, else gelu).
        use_ema: take the EMA weights (state_dict_ema) of a timm training checkpoint.
        labels: a labels file of class names, stored with the model.
        allow_duplicate_labels: accept a labels file that names two classes alike.
        tolerance: the largest abs difference of float32 logits parity allows.
        parity_images: also compare on these images (a folder or tfds:NAME[:SPLIT]).
        skip_parity: convert without the PyTorch run (no proof; for machines without torch).
        force: replace an earlier output (only one whose files are all as its RECORD lists).
        export: the files to write and verify beside the model (no formats: none).

    Example:
        >>> ConvertOptions("convmixer_768_32.pth", export=ExportOptions(formats=("onnx",)))  # doctest: +SKIP
    """

    checkpoint: str
    output: Optional[str] = None
    variant: Optional[str] = None
    activation: Optional[str] = None
    use_ema: bool = False
    labels: Optional[str] = None
    allow_duplicate_labels: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    parity_images: Optional[str] = None
    skip_parity: bool = False
    force: bool = False
    export: ExportOptions = ExportOptions(formats=())


def convert_and_verify(
    options: ConvertOptions, log: Callable[[str], None] = lambda message: None
) -> dict:
    """Converts a checkpoint, proves parity, exports; returns the report (also in report.json).

    Raises CheckpointError / MappingError / OutputExistsError / BadInput on bad input.
    When parity fails, the output holds report.json alone (no model) and
    report["status"] == "parity_failed".

    Example:
        >>> report = convert_and_verify(ConvertOptions("convmixer_768_32.pth"))  # doctest: +SKIP
        >>> report["parity"]["passed"]  # doctest: +SKIP
        True
    """
    from convmixer_tf.labels import read_labels

    exports = [
        fmt.name for fmt in registry.resolve(options.export.formats)
    ]  # checked before any work
    class_names = None
    if options.labels:
        class_names = read_labels(options.labels, options.allow_duplicate_labels)
    inputs = [
        options.checkpoint,
        options.parity_images,
        options.export.calibration_data,
        options.labels,
    ]
    output = options.output or default_output_dir(options.checkpoint)
    with staged(output, options.force, inputs) as staging:
        report = {"status": "ok", "output": staging.output, "timings_s": {}}
        with _step(log, "reading and mapping the checkpoint", report, "convert"):
            conversion = convert_file(
                options.checkpoint,
                options.variant,
                activation=options.activation,
                use_ema=options.use_ema,
                class_names=class_names,
            )
        report["conversion"] = conversion.summary()
        log("  " + conversion.describe())
        _check(conversion, report, log, options)
        conversion.checkpoint.state_dict.clear()  # the Keras model holds its own copy now
        if report["status"] == "ok":
            _save(conversion.model, staging.path, report, log)
        if report["status"] == "ok" and exports:
            with _step(log, f"exporting and verifying {', '.join(exports)}", report, "export"):
                report["files"] += export_formats(
                    conversion.model, staging.path, options.export, log=log
                )
        # what the final move replaces is known only as it happens
        for replaced in staging.moves():
            _write_report(staging.path, report, conversion.model, replaced)
    return report


def _save(model, folder, report, log) -> None:
    from convmixer_tf.saving import save_model

    path = os.path.join(folder, MODEL)
    with _step(log, f"saving {MODEL}", report, "save"):
        save_model(model, path)
    report["files"] = [{"format": "keras", "path": MODEL, "bytes": os.path.getsize(path)}]


def _check(conversion, report, log, options: ConvertOptions) -> None:
    """Parity into the report (its status), unless skipped."""
    if options.skip_parity:
        report["parity"] = {"skipped": True}
    else:
        with _step(
            log, "running the PyTorch reference and the Keras model side by side", report, "parity"
        ):
            parity = prove(conversion, options.tolerance, options.parity_images)
        report["parity"] = parity.to_dict()
        report["status"] = "ok" if parity.passed else "parity_failed"
        log("  " + parity.describe())
    conversion.state_dicts.clear()


def _write_report(folder, report, model, replaced):
    """report.json, and with a model the model card that lets the folder go to the Hub as it is."""
    from convmixer_tf import contract
    from convmixer_tf.card import model_card

    report.pop("replaced", None)  # said by an earlier try of the final move
    if replaced:
        report["replaced"] = replaced
    outputs.write_json_atomic(os.path.join(folder, REPORT), report)
    if report["status"] == "ok":
        outputs.write_atomic(
            os.path.join(folder, CARD), model_card(contract.info_of(model), report)
        )


@contextlib.contextmanager
def _step(log, what, report, key):
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    report["timings_s"][key] = round(time.perf_counter() - start, 3)
    log(f"  done in {report['timings_s'][key]:.1f} s")
