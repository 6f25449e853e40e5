"""The whole job, in one direction: read the checkpoint, map it into Keras, check it
against the PyTorch network, save it, export it.

Everything is written into a staging folder beside the output (made first, so an
unwritable output fails before any work) and moved into place at the very end, so a
failure at any step leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Callable, Optional, Sequence

from convmixer_tf import outputs
from convmixer_tf.export.calibration import CALIBRATION_COUNT
from weights_converter.parity import DEFAULT_TOLERANCE

PARITY_BATCH = 2
REPORT = "report.json"
MODEL = "model.keras"
CARD = "README.md"
SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def output_kind() -> outputs.Output:
    """What the converter writes: a folder with report.json, model.keras and exported files."""
    from convmixer_tf.export import registry

    return outputs.Output("weights_converter", REPORT,
                          lambda report: isinstance(report, dict) and "conversion" in report,
                          (REPORT, MODEL, CARD, *registry.file_patterns()))


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
            facts, read = source.facts(), checkpoint.summary()
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
                    calibration_count=calibration_count, log=log, tflite_output=tflite_output)
        staging.on_commit = lambda staged: _write_report(staged, report, conversion.model)
    return report


def _check(conversion, report, log, *, tolerance, parity_images, skip) -> None:
    """Parity into the report (its status), unless skipped."""
    if skip:
        report["parity"] = {"skipped": True}
    else:
        with _step(log, "running the PyTorch reference and the Keras model side by side", report, "parity"):
            parity = _parity(conversion, tolerance, parity_images)
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


def _parity(conversion, tolerance, parity_images):
    """The parity report of a conversion: the PyTorch reference loaded with the same
    tensors, on a seeded batch and on `parity_images` (timm's eval transform)."""
    import numpy as np

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("parity needs the PyTorch network: pip install 'convmixer-tf[timm]' "
                         "(or pass --skip-parity to convert without the proof)") from None
    from convmixer_tf import contract
    from weights_converter import parity

    torch_model, description = parity.reference(conversion.config, conversion.state_dicts, conversion.matched_variant)
    pre = contract.info_of(conversion.model).preprocessing
    inputs = parity.seeded_inputs(PARITY_BATCH, pre.input_size)
    sets = [{"source": "seeded standard normal (seed 0)", "count": PARITY_BATCH}]
    if parity_images:
        from convmixer_tf.data import parse_source, read_images

        images, names, _ = read_images(parse_source(parity_images), pre)
        inputs = np.concatenate([inputs, images])  # normalised, as the network sees them
        source = parity_images if parity_images.startswith("tfds:") else os.path.abspath(parity_images)
        transform = f"resize {pre.interpolation} to {pre.input_size}/{pre.crop_pct}, centre crop {pre.input_size}"
        sets.append({"source": source, "count": len(names), "transform": transform})
    return parity.check_parity(torch_model, conversion.model, inputs=inputs, tolerance=tolerance,
                               input_sets=sets, reference=description)


@contextlib.contextmanager
def _step(log, what, report, key):
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    report["timings_s"][key] = round(time.perf_counter() - start, 3)
    log(f"  done in {report['timings_s'][key]:.1f} s")


def cache_folder() -> str:
    """Where converted pretrained models are kept: Keras' cache folder (KERAS_HOME, or ~/.keras)."""
    return os.path.join(os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"),
                        "models", "convmixer_tf")


def pretrained(checkpoint, variant: Optional[str] = None, log: Callable[[str], None] = lambda message: None):
    """The Keras model of a checkpoint (`hf-hub:OWNER/NAME[@REV]` or a file): converted here
    with parity against the PyTorch network and cached under the content hash of the
    weights (and the repo's config.json), or the cached one, converting nothing.

    Example:
        >>> model = pretrained("hf-hub:timm/convmixer_768_32.in1k")  # doctest: +SKIP
    """
    from convmixer_tf import contract
    from weights_converter import hub
    from weights_converter.checkpoint import read_checkpoint
    from weights_converter.convert import convert_state_dict
    from weights_converter.parity import ParityError

    source = hub.resolve(checkpoint)
    digest = hashlib.sha256()
    with open(source.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(repr((source.config, variant)).encode())
    cached = os.path.join(cache_folder(), f"{digest.hexdigest()}.keras")
    if os.path.isfile(cached):
        return contract.load_model(cached)
    log(f"converting {checkpoint} (once: the result is kept in {cached}) ...")
    weights = read_checkpoint(source.path)
    conversion = convert_state_dict(weights.state_dict, variant, facts=source.facts())
    parity = _parity(conversion, DEFAULT_TOLERANCE, None)
    if not parity.passed:
        raise ParityError(parity.describe())
    os.makedirs(cache_folder(), exist_ok=True)
    contract.save_model(conversion.model, cached)
    return conversion.model
