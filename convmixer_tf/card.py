"""The model card (README.md) of a converted or published model: Hugging Face front
matter, where the weights came from, the parity figures, the files and their checks, and
the three uses. A folder with one can be uploaded to the Hub as it is."""

from __future__ import annotations

import html
import re
import urllib.parse
from typing import Optional

USES = """\
## Use

In Keras (stock layers: plain `keras.models.load_model` loads `model.keras` too):

```python
import convmixer_tf

model = convmixer_tf.load_model("{keras}")
facts = convmixer_tf.facts_of(model)  # preprocessing and class names travel with the model
```

On a phone, with MediaPipe Tasks' ImageClassifier (Android, iOS, web and Python):

```python
from mediapipe.tasks.python import BaseOptions, vision

options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path="model_int8.tflite"),
                                        max_results=3)
classifier = vision.ImageClassifier.create_from_options(options)
```

On a server, with onnxruntime (input: raw RGB pixels, NHWC):

```python
import onnxruntime

logits = onnxruntime.InferenceSession("model.onnx").run(["logits"], {{"images": images}})[0]
```
"""


def model_card(facts, report: Optional[dict] = None) -> str:
    """README.md text for a model with `facts` (and the converter's `report`).

    Text from outside (a Hub repo's config, a file name) reaches the card only as YAML
    written by a YAML library (the front matter) or as escaped Markdown text (the body).
    """
    source = facts.source or {}
    lines = ["---", front_matter(source).rstrip("\n"), "---", "", *_summary(facts), ""]
    lines += _weights(source)
    lines += _parity((report or {}).get("parity") or {})
    lines += _files((report or {}).get("files", []))
    lines += [
        "Converted from the PyTorch weights with convmixer-tf; every file above was loaded back by "
        "its own runtime and compared with the Keras model before it was written.",
        "",
    ]
    return "\n".join(lines) + USES.format(keras="model.keras")


def front_matter(source: dict) -> str:
    """The Hub's front matter (YAML) of a model whose weights came from `source`."""
    import yaml

    fields = {
        "library_name": "keras",
        "pipeline_tag": "image-classification",
        "tags": ["convmixer", "image-classification", "keras", "tflite", "onnx"],
    }
    if source.get("repo"):
        fields["base_model"] = source["repo"]
    if source.get("license"):
        fields["license"] = source["license"]
    return yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)


def text(value) -> str:
    """`value` as Markdown text that renders as itself: on one line, HTML and Markdown
    characters escaped (a file name or a repo's field can hold `<script>` or `](`)."""
    plain = " ".join(str(value).split())
    plain = html.escape(plain, quote=True)
    return re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", plain)


def _summary(facts) -> list:
    c, pre = facts.config, facts.preprocessing
    names = "" if facts.class_names is None else " (names inside)"
    return [
        f"# ConvMixer-{c.dim}/{c.depth} ({text(facts.variant or 'ConvMixer')}) for Keras 3",
        "",
        f"Kernel {c.kernel_size}, patch {c.patch_size}, {c.activation}, "
        f"{c.num_classes or 'no'} classes{names}; input {pre.input_size} px, "
        f"crop_pct {pre.crop_pct}, {pre.interpolation}, mean {pre.mean}, std {pre.std}.",
    ]


def _weights(source: dict) -> list:
    if source.get("repo"):
        at = text(source.get("commit") or source.get("revision"))
        repo = source["repo"]  # OWNER/NAME, checked where it entered (weights_converter.hub)
        link = f"[{text(repo)}](https://huggingface.co/{urllib.parse.quote(repo, safe='/')})"
        return [f"Weights: {link} at {at}, file {text(source.get('file'))}.", ""]
    if source.get("file"):
        return [f"Weights: {text(source['file'])}.", ""]
    return []


def _parity(parity: dict) -> list:
    if parity.get("max_abs") is None:
        return []
    top1 = ""
    if parity["top1_agreement"] is not None:
        top1 = f", top-1 agreement {parity['top1_agreement']:.0%}"
    return [
        f"Parity with the PyTorch network ({text(parity['reference'])}): max |output difference| "
        f"{parity['max_abs']:.2e} on {parity['num_inputs']} inputs{top1}, every stage compared.",
        "",
    ]


def _files(rows) -> list:
    rows = [row for row in rows if "max_abs" in row]
    if not rows:
        return []
    lines = ["| file | format | size | max abs diff vs Keras | checked |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = "passed" if r["passed"] else "FAILED"
        lines.append(
            f"| `{r['path']}` | {r['format']} | {r['bytes'] / 1e6:.1f} MB | {r['max_abs']:.1e} | {verdict} |"
        )
    return [*lines, ""]
