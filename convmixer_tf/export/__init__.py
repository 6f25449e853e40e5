"""Exporters: every format of `registry.FORMATS` (SavedModel, TFLite float32 / float16 /
dynamic / int8, ONNX float and int8), each file verified.

Every file is loaded back by its own runtime (tf.saved_model, LiteRT and MediaPipe,
onnxruntime) and compared with the Keras model before it counts as written. Importing
this package loads no TensorFlow; the writers do, when called.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

from convmixer_tf import contract
from convmixer_tf.export import registry
from convmixer_tf.export.base import ExportError, ExportFormat, ExportJob
from convmixer_tf.export.calibration import CALIBRATION_COUNT, VERIFY_COUNT
from convmixer_tf.export.onnx import export_onnx
from convmixer_tf.export.registry import FORMATS
from convmixer_tf.export.saved_model import export_saved_model
from convmixer_tf.export.tflite import export_tflite, op_names
from convmixer_tf.export.verify import Runner, verify

__all__ = ["CALIBRATION_COUNT", "FORMATS", "VERIFY_COUNT", "ExportError", "ExportFormat", "ExportJob", "Runner",
           "check_formats", "export_formats", "export_onnx", "export_saved_model", "export_tflite", "format_rows",
           "op_names", "prepare_job", "registry", "verify"]


def check_formats(formats: Sequence[str]) -> list:
    """Validates format names ("all" expands to every format); keeps order, drops repeats."""
    return [fmt.name for fmt in registry.resolve(formats)]


def export_formats(model, directory, formats: Sequence[str], *, calibration_data: Optional[str] = None,
                   preprocessing=None, raw_rgb: bool = True, nchw: bool = False, opset: Optional[int] = None,
                   log: Callable[[str], None] = lambda m: None, calibration_count: int = CALIBRATION_COUNT,
                   verify_count: int = VERIFY_COUNT, latency_runs: int = 10, class_names=None,
                   tflite_output: str = "probabilities", processes: Optional[int] = None) -> list:
    """Writes each format into `directory`, verifies it, returns one row per file.

    Args:
        model: a Keras ConvMixer (any input size: fixed to the preprocessing size here).
        directory: existing output directory.
        formats: registered format names (or "all").
        calibration_data: image folder or "tfds:NAME[:SPLIT]" for int8 calibration and
            the held-out check images; None uses synthetic images (flagged in rows).
        preprocessing: a `convmixer_tf.Preprocessing` (input size, mean/std); default
            the one stored with the model.
        raw_rgb: put the normalisation in every exported graph, so apps feed raw RGB.
        nchw: ONNX input as [N, 3, H, W].
        class_names: the labels of TFLite files and the report; default those stored with
            the model.
        tflite_output: "probabilities" (TFLite files end in a softmax) or "logits".
        processes: 1 writes every file in this process; 2 or more writes each group of
            formats that share work in a process of its own, side by side (see
            `export.parallel`); default: side by side where this process may use
            several cores and the memory available covers it (`parallel.memory_allows`).

    Raises ExportError when a file cannot be made or fails verification; files
    already written stay in `directory` (the CLIs write into a staging directory).
    """
    from convmixer_tf.export.calibration import load_images
    from convmixer_tf.export.parallel import cores, memory_allows, write_in_processes

    chosen = registry.resolve(formats)
    job = prepare_job(model, preprocessing, raw_rgb=raw_rgb, class_names=class_names, nchw=nchw, opset=opset,
                      tflite_output=tflite_output)
    calibrated = any(fmt.calibrated for fmt in chosen)
    count = verify_count + (calibration_count if calibrated else 0)
    images, source = load_images(calibration_data, job.info.preprocessing, count, raw_rgb=job.raw_rgb)
    if len(images) <= verify_count and calibrated:
        raise ValueError(f"{source}: {len(images)} images; int8 needs more than {verify_count} "
                         f"(the last {verify_count} are held out from calibration)")
    held_out, job.calibration, job.calibration_source = images[-verify_count:], images[:-verify_count], source
    checks = {"held_out": held_out, "reference": job.model.predict(held_out, verbose=0, batch_size=8),
              "latency_runs": latency_runs}
    groups = {}
    for fmt in chosen:
        group = fmt.group if fmt in registry.BUILT_IN else "main"  # a worker knows the built-in formats only
        groups.setdefault(group, []).append(fmt)
    groups = dict(sorted(groups.items(), key=lambda item: item[0] != "main"))  # this process: the main group
    try:
        if len(groups) > 1 and (processes > 1 if processes else cores() > 1 and memory_allows(job.model)):
            rows = write_in_processes(groups, job, directory, checks, log)
        else:
            rows = {name: dict(row, latency_ms=runner.latency_ms(held_out, latency_runs))
                    for name, (row, runner) in write_and_check(chosen, job, directory, checks, log).items()}
    finally:
        job.close()
    inputs = f"{source}, last {len(held_out)} (held out from calibration)" if calibrated else source
    return [dict(rows[fmt.name], path=fmt.filename, inputs=inputs, input="raw RGB 0-255" if job.raw_rgb else
                 "normalised") for fmt in chosen]


def write_and_check(formats, job: ExportJob, directory, checks: dict, log) -> dict:
    """{name: (row, its runner)} of each format, written and checked in turn (its latency
    is timed by the caller, when nothing else runs); ExportError at the first that fails."""
    done = {}
    for fmt in formats:
        path = os.path.join(os.fspath(directory), fmt.filename)
        log(f"  {fmt.name} -> {fmt.filename}")
        start = time.perf_counter()
        fmt.write(job, path)
        runner = Runner(path, name=fmt.name)
        row = verify(path, job.model, checks["held_out"], tolerance=fmt.tolerance, name=fmt.name, latency_runs=0,
                     reference=checks["reference"], info=job.info, shared=job.shared, runner=runner)
        if row.get("problem"):
            raise ExportError(f"{fmt.name}: {fmt.filename}: {row['problem']}")
        if not row["passed"]:
            raise ExportError(f"{fmt.name}: {fmt.filename} differs from Keras by {row['max_abs']:.3g} (allowed "
                              f"{row['allowed']:.3g}: tolerance {row['tolerance']} x the largest output, at least 1)")
        done[fmt.name] = (dict(row, seconds=time.perf_counter() - start), runner)
    return done


def prepare_job(model, preprocessing=None, *, raw_rgb: bool = True, class_names=None, **options) -> ExportJob:
    """The model at its export size (raw RGB in, when `raw_rgb`) and what goes with it."""
    from convmixer_tf.model import rebuild

    info = contract.info_of(model)
    pre = preprocessing or info.preprocessing
    h, w = model.input_shape[1:3]
    if h is not None and w is not None:
        if h != w:
            raise ValueError(f"export needs a square input, the model takes {(h, w)}")
        pre = pre.replace(input_size=h)
    size = pre.input_size
    export_model = rebuild(model, (size, size, 3), pre, raw_rgb=True if raw_rgb else info.raw_rgb)
    info = contract.info_of(export_model)
    if class_names:
        info = info.replace(class_names=tuple(class_names))
    return ExportJob(contract.attach(export_model, info), info, **options)


def top1_text(row, short: bool = False) -> str:
    """A row's agreement with Keras' top class, in words where scores tie (`short`: the
    table's cell, a star pointing to `tie_note`)."""
    if row.get("top1_agreement") is None:
        return "n/a"
    tied, all_tied = row.get("top1_tied") or 0.0, row.get("top1_all_tied") or 0.0
    if all_tied == 1.0:
        return "all tied*" if short else "all tied"
    if not tied:
        return f"{row['top1_agreement']:.1%}"
    also = f", {all_tied:.0%} all equal" if all_tied else ""
    return f"{row['top1_among_best']:.1%}*" if short else \
        f"{row['top1_among_best']:.1%} among its best ({tied:.0%} tied{also})"


def tie_note(row) -> str:
    """What a starred top-1 cell means, in plain words."""
    if row.get("top1_all_tied") == 1.0:
        return (f"all {row['classes']} scores round to the same uint8 value on this model, so its top-1 says "
                "nothing here (an unsure model; trained models' int8 files are checked in the tests)")
    size = f" (a median of {row['top1_best_classes']:g} of {row['classes']})" if row.get("top1_best_classes") else ""
    return (f"several classes share the file's top score on {row['top1_tied']:.0%} of the images{size}; Keras' "
            f"top class is among them on {row['top1_among_best']:.1%}")


def phone_summary(row) -> str:
    """What a TFLite row says of MediaPipe and the GPU delegate, in a few words."""
    if "mediapipe" not in row:
        return ""
    mp = row["mediapipe"]
    if mp.get("status") != "ok":
        text = f"MediaPipe {mp.get('status')}"
    else:
        labels = f"{row['labels']} labels" if row.get("labels") else "no labels"
        text = f"MediaPipe ok ({labels}, top-1 {top1_text(mp)}, max|diff| {mp['max_abs']:.1e})"
    return f"{text}; GPU {row.get('gpu_delegate', 'n/a')}"


def format_rows(rows, output=None) -> str:
    """The table both command lines print: one row per written file (after "wrote OUTPUT")."""
    lines = [f"wrote {output}"] if output else []
    lines += [f"  {'format':<15} {'file':<22} {'size':>9} {'output':>13} {'max|diff|':>10} {'top-1':>9} "
             f"{'latency':>10}  phone (MediaPipe, GPU delegate)"]
    for r in rows:
        if "max_abs" not in r:  # a file that is not an export (the converter's model.keras)
            lines.append(f"  {r['format']:<15} {r['path']:<22} {r['bytes'] / 1e6:7.1f}MB")
            continue
        latency = f"{r['latency_ms']:8.1f}ms" if r.get("latency_ms") is not None else f"{'':>10}"
        lines.append(f"  {r['format']:<15} {r['path']:<22} {r['bytes'] / 1e6:7.1f}MB {r['output']:>13} "
                     f"{r['max_abs']:10.2e} {top1_text(r, short=True):>9} {latency}  {phone_summary(r)}")
    checked = next((r for r in rows if "inputs" in r), None)
    if checked:
        lines.append(f"  checked on: {checked['inputs']} ({checked['input']})")
    lines += [f"  * {r['format']}: {tie_note(r)}" for r in rows if top1_text(r, short=True).endswith("*")]
    return "\n".join(lines)
