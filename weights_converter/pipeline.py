"""The whole job: checkpoint file -> Keras model -> parity report -> exported files.

Everything is written into a temporary directory beside the output and moved into
place at the very end, so a failure at any step leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Optional, Sequence

from convmixer_tf.export.files import check_output, staged_output
from weights_converter import mapping
from weights_converter.convert import convert_file
from weights_converter.parity import DEFAULT_TOLERANCE

PARITY_BATCH = 2


def default_output_dir(checkpoint_path) -> str:
    """`dir/name.pth.tar` -> `dir/name_keras`."""
    path = os.path.abspath(os.fspath(checkpoint_path))
    base = os.path.basename(path)
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return os.path.join(os.path.dirname(path), f"{base}_keras")


def convert_and_verify(
    torch_ckpt,
    output: Optional[str] = None,
    variant: Optional[str] = None,
    activation: Optional[str] = None,
    use_ema: bool = False,
    exports: Sequence[str] = (),
    tolerance: float = DEFAULT_TOLERANCE,
    parity_images: Optional[str] = None,
    force: bool = False,
    skip_parity: bool = False,
    calibration_data: Optional[str] = None,
    calibration_count: int = 64,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Converts a checkpoint, proves parity, exports; returns the report (also in report.json).

    Raises CheckpointError / MappingError / OutputExistsError / ValueError on bad input.
    When parity fails, the output holds report.json alone (no model) and
    report["status"] == "parity_failed".

    Example:
        >>> report = convert_and_verify("convmixer_768_32.pth", exports=["onnx"])  # doctest: +SKIP
        >>> report["parity"]["passed"]  # doctest: +SKIP
        True
    """
    output = check_output(output or default_output_dir(torch_ckpt), force)
    if exports:
        from convmixer_tf import export as exporters

        exports = exporters.check_formats(exports)
    report = {"status": "ok", "output": output}

    with _step(log, "reading and mapping the checkpoint") as timing:
        conversion = convert_file(torch_ckpt, variant=variant, activation=activation, use_ema=use_ema)
    report["conversion"] = conversion.summary()
    report["timings_s"] = {"convert": timing["s"]}
    config = conversion.config
    log(f"  {mapping.describe(config)}, {config.activation} ({conversion.activation_source}), "
        f"{config.num_classes if conversion.include_top else 'no'} classes, layout {conversion.layout}, "
        f"matches {conversion.matched_variant or 'no released variant'}")

    if skip_parity:
        report["parity"] = {"skipped": True}
    else:
        with _step(log, "running the PyTorch reference and the Keras model side by side") as timing:
            parity = _parity(conversion, tolerance, parity_images)
        report["timings_s"]["parity"] = timing["s"]
        report["parity"] = parity.to_dict()
        log("  " + parity.describe())
        if not parity.passed:
            report["status"] = "parity_failed"

    conversion.checkpoint.release()  # the Keras model holds its own copy now
    with staged_output(output, force) as staging:
        if report["status"] == "ok":
            with _step(log, "saving model.keras"):
                conversion.model.save(os.path.join(staging, "model.keras"))
            report["files"] = [{"format": "keras", "path": "model.keras",
                                "bytes": os.path.getsize(os.path.join(staging, "model.keras"))}]
            if exports:
                from convmixer_tf import export as exporters

                with _step(log, f"exporting and verifying {', '.join(exports)}") as timing:
                    report["files"] += exporters.export_formats(
                        conversion.model, staging, exports, calibration_data=calibration_data,
                        calibration_count=calibration_count, preprocessing=_preprocessing(conversion), log=log,
                    )
                report["timings_s"]["export"] = timing["s"]
        with open(os.path.join(staging, "report.json"), "w") as f:
            json.dump(report, f, indent=2, default=_jsonable)
    return report


def _parity(conversion, tolerance, parity_images):
    import numpy as np

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("parity needs the PyTorch network: pip install 'convmixer-tf[timm]' "
                         "(or pass --skip-parity to convert without the proof)") from None
    from weights_converter import parity

    torch_model, description, layout = parity.reference_model(
        conversion.config, conversion.include_top, conversion.matched_variant)
    canonical, _ = mapping.to_canonical(conversion.checkpoint.state_dict)
    parity.load_reference(torch_model, layout, canonical, conversion.config.depth)
    pre = _preprocessing(conversion)
    inputs = parity.seeded_inputs(PARITY_BATCH, pre.input_size)
    sets = [{"source": "seeded standard normal (seed 0)", "count": PARITY_BATCH}]
    if parity_images:
        from convmixer_tf.data import load_eval_images

        images, paths = load_eval_images(parity_images, pre)
        inputs = np.concatenate([inputs, images])
        sets.append({"source": os.path.abspath(parity_images), "count": len(paths),
                     "transform": f"resize {pre.interpolation} to {pre.input_size}/{pre.crop_pct}, centre crop {pre.input_size}"})
    return parity.check_parity(torch_model, conversion.model, inputs=inputs, tolerance=tolerance,
                               input_sets=sets, reference=description)


def _preprocessing(conversion):
    from convmixer_tf.config import VARIANTS, Preprocessing

    if conversion.matched_variant in VARIANTS:
        return VARIANTS[conversion.matched_variant].preprocessing
    return Preprocessing()


@contextlib.contextmanager
def _step(log, what):
    log(f"{what} ...")
    timing = {}
    start = time.perf_counter()
    yield timing
    timing["s"] = round(time.perf_counter() - start, 3)
    log(f"  done in {timing['s']:.1f} s")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
