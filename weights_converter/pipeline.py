"""The whole job, in one direction: read the checkpoint, map it into Keras, check it
against the PyTorch network, save it, export it.

Everything is written into a staging folder beside the output (made first, so an
unwritable output fails before any work) and moved into place at the very end, so a
failure at any step leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Optional, Sequence

from convmixer_tf import outputs
from convmixer_tf.export.calibration import CALIBRATION_COUNT
from weights_converter.parity import DEFAULT_TOLERANCE, prove

REPORT = "report.json"
MODEL = "model.keras"
CARD = "README.md"
SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def output_kind() -> outputs.Output:
    """What the converter writes: a folder with report.json, model.keras and exported files."""
    from convmixer_tf.export import registry

    return outputs.Output("weights_converter", REPORT,
                          lambda report: isinstance(report, dict) and "conversion" in report,
                          (*outputs.exactly(REPORT, MODEL, CARD), *registry.file_patterns()))


def default_output_dir(checkpoint_path) -> str:
    """`dir/name.pth.tar` -> `dir/name_keras`; `hf-hub:owner/name` -> `./name_keras`."""
    from weights_converter import hub

    if hub.is_hub_id(checkpoint_path):
        return os.path.abspath(hub.parse(checkpoint_path)[0].split("/")[1] + "_keras")
    path = os.path.abspath(os.fspath(checkpoint_path))
    base = os.path.basename(path)
    base = next((base[: -len(s)] for s in SUFFIXES if base.endswith(s)), base)
    return os.path.join(os.path.dirname(path), f"{base}_keras")


def convert_and_verify(torch_ckpt, output: Optional[str] = None, *, variant: Optional[str] = None,
                       activation: Optional[str] = None, use_ema: bool = False, exports: Sequence[str] = (),
                       tolerance: float = DEFAULT_TOLERANCE, parity_images: Optional[str] = None, force: bool = False,
                       skip_parity: bool = False, calibration_data: Optional[str] = None,
                       calibration_count: int = CALIBRATION_COUNT, log: Callable[[str], None] = lambda message: None,
                       labels: Optional[str] = None, allow_duplicate_labels: bool = False,
                       tflite_output: str = "probabilities", processes: Optional[int] = None) -> dict:
    """Converts a checkpoint, proves parity, exports; returns the report (also in report.json).

    Raises CheckpointError / MappingError / OutputExistsError / ValueError on bad input.
    When parity fails, the output holds report.json alone (no model) and
    report["status"] == "parity_failed".

    Example:
        >>> report = convert_and_verify("convmixer_768_32.pth", exports=["onnx"])  # doctest: +SKIP
        >>> report["parity"]["passed"]  # doctest: +SKIP
        True
    """
    from convmixer_tf import contract
    from convmixer_tf import export as exporters
    from convmixer_tf.export import registry
    from weights_converter import hub
    from weights_converter.checkpoint import read_checkpoint
    from weights_converter.convert import convert_state_dict

    exports = [fmt.name for fmt in registry.resolve(exports)]
    class_names = contract.read_labels(labels, allow_duplicate_labels) if labels else None
    inputs = [torch_ckpt, parity_images, calibration_data, labels]
    with outputs.staged(output or default_output_dir(torch_ckpt), output_kind(), force, inputs) as staging:
        report = {"status": "ok", "output": staging.output, "timings_s": {}}
        with _step(log, "reading and mapping the checkpoint", report, "convert"):
            source = hub.resolve(torch_ckpt)
            checkpoint = read_checkpoint(source.path, use_ema=use_ema)
            facts, read = source.facts, checkpoint.summary()
            conversion = convert_state_dict(checkpoint.state_dict, variant, activation=activation,
                                            class_names=class_names, facts=facts)
        report["conversion"] = dict(conversion.summary(), checkpoint=read)
        log("  " + conversion.describe())
        _check(conversion, report, log, tolerance=tolerance, parity_images=parity_images, skip=skip_parity)
        checkpoint.state_dict.clear()  # the Keras model holds its own copy now (file pages released too)
        if report["status"] == "ok":
            with _step(log, f"saving {MODEL}", report, "save"):
                contract.save_model(conversion.model, os.path.join(staging.path, MODEL))
            report["files"] = [{"format": "keras", "path": MODEL,
                                "bytes": os.path.getsize(os.path.join(staging.path, MODEL))}]
        if report["status"] == "ok" and exports:
            with _step(log, f"exporting and verifying {', '.join(exports)}", report, "export"):
                report["files"] += exporters.export_formats(
                    conversion.model, staging.path, exports, calibration_data=calibration_data,
                    calibration_count=calibration_count, log=log, tflite_output=tflite_output,
                    processes=processes)
        staging.on_commit = lambda staged: _write_report(staged, report, conversion.model)
    return report


def _check(conversion, report, log, *, tolerance, parity_images, skip) -> None:
    """Parity into the report (its status), unless skipped."""
    if skip:
        report["parity"] = {"skipped": True}
    else:
        with _step(log, "running the PyTorch reference and the Keras model side by side", report, "parity"):
            parity = prove(conversion, tolerance, parity_images)
        report["parity"] = parity.to_dict()
        report["status"] = "ok" if parity.passed else "parity_failed"
        log("  " + parity.describe())
    conversion.state_dicts.clear()


def _write_report(staging, report, model):
    """report.json, and with a model the model card that lets the folder go to the Hub as it is."""
    from convmixer_tf import contract
    from convmixer_tf.card import model_card

    if staging.replaced:
        report["replaced"] = staging.replaced
    outputs.write_json_atomic(os.path.join(staging.path, REPORT), report)
    if report["status"] == "ok":
        outputs.write_atomic(os.path.join(staging.path, CARD), model_card(contract.info_of(model), report))


@contextlib.contextmanager
def _step(log, what, report, key):
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    report["timings_s"][key] = round(time.perf_counter() - start, 3)
    log(f"  done in {report['timings_s'][key]:.1f} s")
