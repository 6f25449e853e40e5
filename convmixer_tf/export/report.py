"""The words of an export's rows: the table both command lines print, and what a starred
top-1 cell means where quantised scores tie."""

from __future__ import annotations


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
    return (
        f"{row['top1_among_best']:.1%}*"
        if short
        else f"{row['top1_among_best']:.1%} among its best ({tied:.0%} tied{also})"
    )


def tie_note(row) -> str:
    """What a starred top-1 cell means, in plain words."""
    if row.get("top1_all_tied") == 1.0:
        return (
            f"all {row['classes']} scores round to the same uint8 value on this model, so its top-1 says "
            "nothing here (an unsure model; trained models' int8 files are checked in the tests)"
        )
    size = (
        f" (a median of {row['top1_best_classes']:g} of {row['classes']})"
        if row.get("top1_best_classes")
        else ""
    )
    return (
        f"several classes share the file's top score on {row['top1_tied']:.0%} of the images{size}; Keras' "
        f"top class is among them on {row['top1_among_best']:.1%}"
    )


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
    lines += [
        f"  {'format':<15} {'file':<22} {'size':>9} {'output':>13} {'max|diff|':>10} {'top-1':>9} "
        f"{'latency':>10}  phone (MediaPipe, GPU delegate)"
    ]
    for r in rows:
        if "max_abs" not in r:  # a file that is not an export (the converter's model.keras)
            lines.append(f"  {r['format']:<15} {r['path']:<22} {r['bytes'] / 1e6:7.1f}MB")
            continue
        latency = f"{r['latency_ms']:8.1f}ms" if r.get("latency_ms") is not None else f"{'':>10}"
        lines.append(
            f"  {r['format']:<15} {r['path']:<22} {r['bytes'] / 1e6:7.1f}MB {r['output']:>13} "
            f"{r['max_abs']:10.2e} {top1_text(r, short=True):>9} {latency}  {phone_summary(r)}"
        )
    checked = next((r for r in rows if "inputs" in r), None)
    if checked:
        lines.append(f"  checked on: {checked['inputs']} ({checked['input']})")
    lines += [
        f"  * {r['format']}: {tie_note(r)}" for r in rows if top1_text(r, short=True).endswith("*")
    ]
    return "\n".join(lines)
