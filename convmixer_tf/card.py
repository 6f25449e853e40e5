"""The model card (README.md) of a converted or published model: Hugging Face front
matter, where the weights came from, the parity figures, the files and their checks, and
the three uses. A folder with one can be uploaded to the Hub as it is."""

from __future__ import annotations

from typing import Optional

USES = """\
## Use

In Keras (stock layers: plain `keras.models.load_model` loads `model.keras` too):

```python
import convmixer_tf

model = convmixer_tf.load_model("{keras}")
info = convmixer_tf.info_of(model)     # preprocessing and class names travel with the model
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


def model_card(info, report: Optional[dict] = None) -> str:
    """README.md text for a model with facts `info` (and the converter's `report`)."""
    source = info.source or {}
    c, pre = info.config, info.preprocessing
    front = ["---", "library_name: keras", "pipeline_tag: image-classification",
             "tags: [convmixer, image-classification, keras, tflite, onnx]"]
    front += [f"base_model: {source['repo']}"] if source.get("repo") else []
    front += [f"license: {source['license']}"] if source.get("license") else []
    lines = front + ["---", "", f"# ConvMixer-{c.dim}/{c.depth} ({info.variant or 'ConvMixer'}) for Keras 3", "",
                     f"Kernel {c.kernel_size}, patch {c.patch_size}, {c.activation}, {c.num_classes or 'no'} classes"
                     f"{'' if info.class_names is None else ' (names inside)'}; input {pre.input_size} px, crop_pct "
                     f"{pre.crop_pct}, {pre.interpolation}, mean {pre.mean}, std {pre.std}.", ""]
    if source.get("repo"):
        lines += [f"Weights: [{source['repo']}](https://huggingface.co/{source['repo']}) at "
                  f"{source.get('commit') or source.get('revision')}, file {source.get('file')}.", ""]
    elif source.get("file"):
        lines += [f"Weights: {source['file']}.", ""]
    parity = (report or {}).get("parity") or {}
    if parity.get("max_abs") is not None:
        top1 = "" if parity["top1_agreement"] is None else f", top-1 agreement {parity['top1_agreement']:.0%}"
        lines += [f"Parity with the PyTorch network ({parity['reference']}): max |output difference| "
                  f"{parity['max_abs']:.2e} on {parity['num_inputs']} inputs{top1}, every stage compared.", ""]
    files = [row for row in (report or {}).get("files", []) if "max_abs" in row]
    if files:
        lines += ["| file | format | size | max abs diff vs Keras | checked |", "|---|---|---|---|---|"]
        lines += [f"| `{r['path']}` | {r['format']} | {r['bytes'] / 1e6:.1f} MB | {r['max_abs']:.1e} | "
                  f"{'passed' if r['passed'] else 'FAILED'} |" for r in files] + [""]
    lines += ["Converted from the PyTorch weights with convmixer-tf; every file above was loaded back by its own "
              "runtime and compared with the Keras model before it was written.", ""]
    return "\n".join(lines) + USES.format(keras="model.keras")
