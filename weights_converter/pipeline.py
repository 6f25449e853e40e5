"""The whole job: checkpoint file -> Keras model -> parity report -> exported files.

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
from weights_converter import mapping
from weights_converter.convert import convert_file
from weights_converter.parity import DEFAULT_TOLERANCE

PARITY_BATCH = 2
REPORT = "report.json"
MODEL = "model.keras"


def output_kind() -> outputs.Output:
    """What the converter writes: a folder with report.json, model.keras and exported files."""
    from convmixer_tf.export import registry

    return outputs.Output("weights_converter", REPORT,
                          lambda report: isinstance(report, dict) and "conversion" in report,
                          (REPORT, MODEL, *registry.file_patterns()))


def default_output_dir(checkpoint_path) -> str:
    """`dir/name.pth.tar` -> `dir/name_keras`."""
    path = os.path.abspath(os.fspath(checkpoint_path))
    base = os.path.basename(path)
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return os.path.join(os.path.dirname(path), f"{base}_keras")


def convert_and_verify(torch_ckpt, output: Optional[str] = None, *, variant: Optional[str] = None,
                       activation: Optional[str] = None, use_ema: bool = False, exports: Sequence[str] = (),
                       tolerance: float = DEFAULT_TOLERANCE, parity_images: Optional[str] = None, force: bool = False,
                       skip_parity: bool = False, calibration_data: Optional[str] = None,
                       calibration_count: int = CALIBRATION_COUNT, log: Callable[[str], None] = lambda message: None,
                       labels: Optional[str] = None, allow_duplicate_labels: bool = False,
                       tflite_output: str = "probabilities") -> dict:
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

    exports = exporters.check_formats(exports) if exports else []
    inputs = [torch_ckpt, parity_images, calibration_data, labels]
    class_names = contract.read_labels(labels, allow_duplicate_labels) if labels else None
    with outputs.staged(output or default_output_dir(torch_ckpt), output_kind(), force, inputs) as staging:
        report = {"status": "ok", "output": staging.output}
        conversion = _convert(torch_ckpt, variant, activation, use_ema, class_names, report, log)
        if skip_parity:
            report["parity"] = {"skipped": True}
        else:
            _prove_parity(conversion, tolerance, parity_images, report, log)
        conversion.checkpoint.release()  # the Keras model holds its own copy now
        if report["status"] == "ok":
            _write_model(conversion, staging.path, report, log)
            if exports:
                _export(conversion, staging.path, exports, calibration_data, calibration_count, tflite_output,
                        report, log)
        staging.before_commit(lambda staged: _write_report(staged, report))
    return report


def _convert(torch_ckpt, variant, activation, use_ema, class_names, report, log):
    with _step(log, "reading and mapping the checkpoint") as timing:
        conversion = convert_file(torch_ckpt, variant=variant, activation=activation, use_ema=use_ema,
                                  class_names=class_names)
    report["conversion"] = conversion.summary()
    report["timings_s"] = {"convert": timing["s"]}
    config = conversion.config
    log(f"  {mapping.describe(config)}, {config.activation} ({conversion.activation_source}), "
        f"{config.num_classes if conversion.include_top else 'no'} classes (names: {conversion.class_names_source}), "
        f"layout {conversion.layout}, matches {conversion.matched_variant or 'no released variant'}")
    return conversion


def _prove_parity(conversion, tolerance, parity_images, report, log):
    with _step(log, "running the PyTorch reference and the Keras model side by side") as timing:
        parity = _parity(conversion, tolerance, parity_images)
    report["timings_s"]["parity"] = timing["s"]
    report["parity"] = parity.to_dict()
    log("  " + parity.describe())
    if not parity.passed:
        report["status"] = "parity_failed"


def _write_model(conversion, directory, report, log):
    from convmixer_tf import contract

    with _step(log, f"saving {MODEL}"):
        contract.save_model(conversion.model, os.path.join(directory, MODEL))
    report["files"] = [{"format": "keras", "path": MODEL, "bytes": os.path.getsize(os.path.join(directory, MODEL))}]


def _export(conversion, directory, exports, calibration_data, calibration_count, tflite_output, report, log):
    from convmixer_tf import export as exporters

    with _step(log, f"exporting and verifying {', '.join(exports)}") as timing:
        report["files"] += exporters.export_formats(
            conversion.model, directory, exports, calibration_data=calibration_data,
            calibration_count=calibration_count, log=log, tflite_output=tflite_output)
    report["timings_s"]["export"] = timing["s"]


def _write_report(staging, report):
    if staging.replaced:
        report["replaced"] = staging.replaced
    outputs.write_json_atomic(os.path.join(staging.path, REPORT), report)


def _parity(conversion, tolerance, parity_images):
    import numpy as np

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("parity needs the PyTorch network: pip install 'convmixer-tf[timm]' "
                         "(or pass --skip-parity to convert without the proof)") from None
    from convmixer_tf import contract
    from weights_converter import parity

    torch_model, description, layout = parity.reference_model(
        conversion.config, conversion.include_top, conversion.matched_variant)
    canonical, _ = mapping.to_canonical(conversion.checkpoint.state_dict)
    parity.load_reference(torch_model, layout, canonical, conversion.config.depth)
    pre = contract.info_of(conversion.model).preprocessing
    inputs = parity.seeded_inputs(PARITY_BATCH, pre.input_size)
    sets = [{"source": "seeded standard normal (seed 0)", "count": PARITY_BATCH}]
    if parity_images:
        from convmixer_tf.data import parse_source, read_images

        images, names, description_ = read_images(parse_source(parity_images), pre)
        inputs = np.concatenate([inputs, images])
        source = parity_images if parity_images.startswith("tfds:") else os.path.abspath(parity_images)
        transform = f"resize {pre.interpolation} to {pre.input_size}/{pre.crop_pct}, centre crop {pre.input_size}"
        sets.append({"source": source, "count": len(names), "transform": transform})
    return parity.check_parity(torch_model, conversion.model, inputs=inputs, tolerance=tolerance,
                               input_sets=sets, reference=description)


@contextlib.contextmanager
def _step(log, what):
    log(f"{what} ...")
    timing = {}
    start = time.perf_counter()
    yield timing
    timing["s"] = round(time.perf_counter() - start, 3)
    log(f"  done in {timing['s']:.1f} s")
