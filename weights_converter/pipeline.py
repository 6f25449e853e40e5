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
from typing import Callable, Dict, List, Optional

from convmixer_tf import outputs
from convmixer_tf.errors import BadInput
from convmixer_tf.export import ExportOptions, export_formats, registry
from convmixer_tf.staging import staged
from weights_converter import hub
from weights_converter.convert import convert_file
from weights_converter.layouts import shown
from weights_converter.parity import DEFAULT_TOLERANCE, ParityReport, prove

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
    try:  # the longest file name the folder's file system takes, in bytes
        longest = os.pathconf(os.path.dirname(path), "PC_NAME_MAX")
    except (OSError, ValueError):  # not known
        longest = None
    if longest and len(os.fsencode(f"{base}_keras")) > longest:
        raise BadInput(
            f"the default output for {shown(path, 1000)} would be a name longer than {longest} "
            "bytes, which its file system refuses: pass --output DIR"
        )
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


@dataclasses.dataclass
class Report:
    """What one conversion did: `convert_and_verify` returns it, report.json holds it.

    Attributes:
        output: the output folder.
        conversion: what was read and how it was mapped (`Conversion.summary()`).
        parity: the proof, None when it was skipped.
        files: one row per file written: model.keras, then each export (none when parity
            failed).
        timings_s: seconds per step.
        replaced: what --force replaced, if anything ("existing output", ...).
    """

    output: str
    conversion: dict
    parity: Optional[ParityReport]
    files: List[dict]
    timings_s: Dict[str, float]
    replaced: Optional[str] = None

    @property
    def passed(self) -> bool:
        """Parity held (or was skipped), so the model and its exports were written."""
        return self.parity is None or self.parity.passed

    def to_dict(self) -> dict:
        """report.json's content."""
        report = {
            "status": "ok" if self.passed else "parity_failed",
            "output": self.output,
            "timings_s": self.timings_s,
            "conversion": self.conversion,
            "parity": {"skipped": True} if self.parity is None else self.parity.to_dict(),
            "files": self.files,
        }
        if self.replaced:
            report["replaced"] = self.replaced
        return report


def convert_and_verify(
    options: ConvertOptions, log: Callable[[str], None] = lambda message: None
) -> Report:
    """Converts a checkpoint, proves parity, exports; returns the report (also in report.json).

    Raises CheckpointError / MappingError / OutputExistsError / BadInput on bad input.
    When parity fails, the output holds report.json alone (no model) and
    `report.passed` is False.

    Example:
        >>> report = convert_and_verify(ConvertOptions("convmixer_768_32.pth"))  # doctest: +SKIP
        >>> report.passed, report.parity.max_abs < 1e-4  # doctest: +SKIP
        (True, True)
    """
    from convmixer_tf.labels import read_labels

    # checked before any work
    exports = [fmt.name for fmt in registry.resolve(options.export.formats)]
    labels = options.labels
    class_names = read_labels(labels, options.allow_duplicate_labels) if labels else None
    inputs = [
        options.checkpoint,
        options.parity_images,
        options.export.calibration_data,
        options.labels,
    ]
    output = options.output or default_output_dir(options.checkpoint)
    with staged(output, options.force, inputs) as staging:
        timings = {}
        with _step(log, "reading and mapping the checkpoint", timings, "convert"):
            conversion = convert_file(
                options.checkpoint,
                options.variant,
                activation=options.activation,
                use_ema=options.use_ema,
                class_names=class_names,
            )
        log("  " + conversion.describe())
        parity = _prove(conversion, options, timings, log)
        # The one place memory is given back: the Keras model holds its own copy of every
        # weight, and exporting, the step that needs the most, comes next.
        conversion.release()
        report = Report(staging.output, conversion.summary(), parity, [], timings)
        if report.passed:
            report.files = _write_files(
                conversion.model,
                staging.path,
                exports=exports,
                options=options,
                timings=timings,
                log=log,
            )
        # what the final move replaces is known only as it happens
        for replaced in staging.moves():
            _write_report(staging.path, report, conversion.model, replaced)
    return report


def _prove(conversion, options: ConvertOptions, timings, log) -> Optional[ParityReport]:
    """The parity report of `conversion`, None when skipped."""
    if options.skip_parity:
        return None
    what = "running the PyTorch reference and the Keras model side by side"
    with _step(log, what, timings, "parity"):
        parity = prove(conversion, options.tolerance, options.parity_images)
    log("  " + parity.describe())
    return parity


def _write_files(model, folder, *, exports, options: ConvertOptions, timings, log) -> List[dict]:
    """model.keras, then each export, into `folder`; their rows."""
    from convmixer_tf.saving import save_model

    path = os.path.join(folder, MODEL)
    with _step(log, f"saving {MODEL}", timings, "save"):
        save_model(model, path)
    files = [{"format": "keras", "path": MODEL, "bytes": os.path.getsize(path)}]
    if exports:
        with _step(log, f"exporting and verifying {', '.join(exports)}", timings, "export"):
            files += export_formats(model, folder, options.export, log=log)
    return files


def _write_report(folder, report: Report, model, replaced):
    """report.json, and with a model the model card that lets the folder go to the Hub as it is."""
    from convmixer_tf.card import model_card
    from convmixer_tf.facts import facts_of

    report.replaced = replaced
    content = report.to_dict()
    outputs.write_json_atomic(os.path.join(folder, REPORT), content)
    if report.passed:
        outputs.write_atomic(os.path.join(folder, CARD), model_card(facts_of(model), content))


@contextlib.contextmanager
def _step(log, what, timings, key):
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)
    log(f"  done in {timings[key]:.1f} s")
