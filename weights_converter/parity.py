"""Runs the real PyTorch network and the Keras one side by side, stage by stage.

The reference is timm's ConvMixer when timm is installed (timm.create_model for a
released variant, timm's ConvMixer class for any other size), otherwise the paper's
nn.Sequential (`paper_convmixer`). Both run in eval mode on the same inputs; the report
gives logit differences, top-1 agreement, and the difference after the stem and after
every block, naming the first stage that diverges.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional

import numpy as np

from convmixer_tf.config import VARIANTS, ConvMixerConfig
from convmixer_tf.errors import BadInput, CheckFailed
from convmixer_tf.export.scores import allowed
from convmixer_tf.facts import facts_of
from weights_converter import layouts
from weights_converter.stages import KerasStages, TorchStages

DEFAULT_TOLERANCE = 1e-4
SEEDED_BATCH = 2  # seeded inputs every conversion is checked on
# What one image's stage outputs may hold, the two networks together, at the seeded
# inputs' size: every released variant fits at 224 px (convmixer_1536_20, the largest,
# keeps 252 MiB), while a network whose stages keep more is checked on smaller images.
PARITY_BUDGET_BYTES = 256 << 20
MIB = 1 << 20


class ParityError(CheckFailed):
    """Keras and PyTorch disagree beyond the tolerance (exit code 1)."""


@dataclasses.dataclass
class StageDiff:
    name: str
    max_abs: float
    # max |keras - torch| / max(1, max |torch|) over the stage output (scores.allowed)
    max_rel: float
    diverged: bool


@dataclasses.dataclass
class ParityReport:
    passed: bool
    tolerance: float
    max_abs: float
    max_rel: float
    top1_agreement: Optional[float]
    num_inputs: int
    input_shape: List[int]
    inputs: List[dict]
    stages: List[StageDiff]
    first_divergent_stage: Optional[str]
    reference: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _sizes(self) -> str:
        """' of 161 px (not the input size 224: ...)', as the input sets say."""
        sizes = sorted({entry["size"] for entry in self.inputs if "size" in entry})
        if not sizes:
            return ""
        reasons = [entry["size_reason"] for entry in self.inputs if "size_reason" in entry]
        text = f" of {' and '.join(str(size) for size in sizes)} px"
        return text + "".join(f" ({reason})" for reason in reasons)

    def describe(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.1%}"
        text = (
            f"parity {'PASSED' if self.passed else 'FAILED'}: max |logit diff| {self.max_abs:.2e} (tolerance "
            f"{self.tolerance:.0e}), max rel {self.max_rel:.2e}, top-1 agreement {top1} on {self.num_inputs} "
            f"inputs{self._sizes()}; reference {self.reference}"
        )
        if self.first_divergent_stage:
            stage = next(s for s in self.stages if s.name == self.first_divergent_stage)
            text += f"; first diverging stage: {stage.name} (max abs diff {stage.max_abs:.3g})"
        return text


def paper_convmixer(
    dim, depth, kernel_size=9, patch_size=7, n_classes=1000, *, activation="gelu", depthwise=True
):
    """The paper's ConvMixer as an nn.Sequential (the authors' convmixer.py; exact GELU),
    with the two knobs the released code and the paper's listing differ on: the
    activation and groups=dim. Its state dict uses the paper's keys (0.weight, 3.0.fn.0.weight, ...)."""
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *[
            nn.Sequential(
                Residual(
                    nn.Sequential(
                        nn.Conv2d(
                            dim, dim, kernel_size, groups=dim if depthwise else 1, padding="same"
                        ),
                        act(),
                        nn.BatchNorm2d(dim),
                    )
                ),
                nn.Conv2d(dim, dim, kernel_size=1),
                act(),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        ],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )


def reference_model(
    config: ConvMixerConfig, include_top: bool = True, variant: Optional[str] = None
):
    """Builds the PyTorch ConvMixer for `config`; returns (module, description, layout).

    For a released variant the architecture, activation included, is timm's own
    registered model, so a wrong --activation shows up as a parity failure. Without timm,
    or for a full k x k convolution, it is the paper's nn.Sequential (`paper_convmixer`).
    """
    import torch.nn as nn

    num_classes = config.num_classes if include_top else 0
    timm = _import_timm()
    if timm is not None and config.depthwise:
        if variant in VARIANTS and VARIANTS[variant].timm_name:
            model = timm.create_model(
                VARIANTS[variant].timm_name, pretrained=False, num_classes=num_classes
            )
            return (
                model.eval(),
                f"timm.create_model({variant!r}, num_classes={num_classes})",
                "timm",
            )
        from timm.models.convmixer import ConvMixer

        act = {"gelu": nn.GELU, "relu": nn.ReLU}[config.activation]
        model = ConvMixer(
            config.dim,
            config.depth,
            kernel_size=config.kernel_size,
            patch_size=config.patch_size,
            num_classes=num_classes,
            act_layer=act,
        )
        return model.eval(), f"timm ConvMixer({config.describe()}, {config.activation})", "timm"
    model = paper_convmixer(
        config.dim,
        config.depth,
        config.kernel_size,
        config.patch_size,
        max(num_classes, 1),
        activation=config.activation,
        depthwise=config.depthwise,
    )
    if not include_top:
        model = nn.Sequential(*list(model)[:-1])
    return (
        model.eval(),
        f"paper nn.Sequential({config.describe()}, {config.activation})",
        "sequential",
    )


def seeded_inputs(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised-space NHWC inputs (what the network sees after mean/std)."""
    return (
        np.random.default_rng(seed).standard_normal((batch_size, size, size, 3)).astype(np.float32)
    )


def parity_size(config: ConvMixerConfig, input_size: int) -> int:
    """The image side the seeded parity inputs take: `input_size`, unless one image's stage
    outputs there (the stem's and each block's, in both networks, float32) would hold more
    than PARITY_BUDGET_BYTES; then the largest whole number of patches that fits, at least
    one. What parity costs follows the network (a patch of 1 px keeps every pixel in every
    stage), while every released variant runs at its own 224 px.

    Example:
        >>> parity_size(get_variant("convmixer_768_32").config, 224)  # doctest: +SKIP
        224
    """
    per_token = stage_bytes(config, config.patch_size)
    tokens = math.isqrt(PARITY_BUDGET_BYTES // per_token)
    if tokens >= input_size // config.patch_size:
        return input_size
    return max(tokens, 1) * config.patch_size


def stage_bytes(config: ConvMixerConfig, size: int) -> int:
    """What one image of `size` px holds in stage outputs, both networks together."""
    side = size // config.patch_size
    return 2 * (config.depth + 1) * side * side * config.dim * 4


def check_parity(
    torch_model,
    keras_model,
    inputs=None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 2,
    image_size: int = 224,
    seed: int = 0,
    input_sets: Optional[List[dict]] = None,
    reference: str = "",
) -> ParityReport:
    """Compares a PyTorch ConvMixer and its Keras conversion on the same NHWC images.

    The images run one at a time, and only one image's stage outputs are held at once:
    what parity costs is what one image costs.

    Args:
        torch_model: a ConvMixer in any layout the converter reads (timm's, the paper's
            nn.Sequential or one-liner, labml's), weights loaded.
        keras_model: the converted Keras model.
        inputs: an NHWC float32 batch in the network's input space, or a list of such
            batches (of different sizes); default a seeded standard-normal batch of
            `batch_size` images of `image_size` pixels.
        tolerance: largest allowed absolute difference of the final outputs.

    Example:
        >>> report = check_parity(timm_model, keras_model)  # doctest: +SKIP
        >>> report.passed, report.first_divergent_stage  # doctest: +SKIP
        (True, None)
    """
    if inputs is None:
        inputs = seeded_inputs(batch_size, image_size, seed)
        input_sets = [{"source": f"seeded standard normal (seed {seed})", "count": batch_size}]
    batches = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if not any(len(batch) for batch in batches):
        raise BadInput("parity needs at least one image to run both networks on")
    stages, outputs = _compare(torch_model, keras_model, batches, tolerance)
    final = stages[-1]
    final.diverged = final.max_abs > tolerance or not np.isfinite(final.max_abs)
    keras_out, torch_out = (np.concatenate(side) for side in zip(*outputs))
    top1 = None
    if keras_out.ndim == 2 and keras_out.shape[1] > 1 and facts_of(keras_model).config.num_classes:
        top1 = float(np.mean(keras_out.argmax(1) == torch_out.argmax(1)))
    return ParityReport(
        passed=bool(not final.diverged and np.isfinite(keras_out).all()),
        tolerance=tolerance,
        max_abs=final.max_abs,
        max_rel=final.max_rel,
        top1_agreement=top1,
        num_inputs=len(outputs),
        input_shape=list(np.shape(batches[0])[1:]),
        inputs=input_sets or [],
        stages=stages,
        first_divergent_stage=next((s.name for s in stages if s.diverged), None),
        reference=reference,
    )


def _compare(torch_model, keras_model, batches, tolerance):
    """Each image of `batches` through both networks, one at a time: the stages' StageDiffs
    over all of them, and each image's (Keras, PyTorch) outputs."""
    torch_stages = TorchStages(torch_model)
    keras_stages = KerasStages(keras_model, torch_stages.depth)
    worst = largest = 0.0
    outputs = []
    for batch in batches:
        for i in range(len(batch)):
            image = np.ascontiguousarray(batch[i : i + 1], dtype=np.float32)
            pairs = list(zip(torch_stages(image), keras_stages(image)))
            for (name, ref), value in pairs:
                if value.shape != ref.shape:
                    raise ParityError(
                        f"{name}: Keras shape {value.shape} != PyTorch shape {ref.shape}"
                    )
            worst = np.maximum(worst, [_max_abs(value, ref) for (_, ref), value in pairs])
            largest = np.maximum(largest, [_max_abs(ref) for (_, ref), _ in pairs])
            outputs.append((pairs[-1][1], pairs[-1][0][1]))
            del pairs  # before the next image's stages are made
    names = [name for name, _ in torch_stages.modules] + ["output"]
    return [
        _stage(name, float(diff), float(ref), tolerance)
        for name, diff, ref in zip(names, worst, largest)
    ], outputs


def _max_abs(value, ref=0.0) -> float:
    """max |value - ref|, in float64 (0 for an empty stage)."""
    return float(np.max(np.abs(value.astype(np.float64) - ref))) if value.size else 0.0


def _stage(name, max_abs, largest, tolerance) -> StageDiff:
    """The stage's StageDiff: `largest` is the largest |PyTorch value| over all images."""
    diverged = max_abs > allowed(tolerance, largest) or not np.isfinite(max_abs)
    return StageDiff(name, max_abs, max_abs / allowed(1.0, largest), bool(diverged))


def _import_timm():
    try:
        import timm
    except Exception:  # timm missing, or torchvision broken beside this torch build
        return None
    return timm


def prove(
    conversion, tolerance: float = DEFAULT_TOLERANCE, images: Optional[str] = None
) -> ParityReport:
    """The parity report of a conversion (`weights_converter.convert.Conversion`): the PyTorch
    reference loaded with the same tensors, on a seeded batch and on `images` (a folder or
    tfds:NAME[:SPLIT], with timm's eval transform).

    Example:
        >>> prove(convert_file("convmixer_768_32.pth")).passed  # doctest: +SKIP
        True
    """
    try:
        import torch
    except ImportError:
        raise BadInput(
            "parity needs the PyTorch network: pip install 'convmixer-tf[timm]' "
            "(or pass --skip-parity to convert without the proof)"
        ) from None
    facts = facts_of(conversion.model)
    config = facts.config
    torch_model, description, layout = reference_model(
        config, config.num_classes > 0, facts.variant
    )
    # the tensors under the reference's own names, loaded strictly
    tensors = layouts.from_canonical(conversion.canonical, layout, config.depth)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    pre = facts.preprocessing
    seeded, entry = _seeded(config, pre.input_size)
    inputs, sets = [seeded], [entry]
    if images:
        from convmixer_tf.images import parse_source, read_images

        pictures, names, _ = read_images(parse_source(images), pre)
        inputs.append(pictures)  # normalised, as the network sees them; at the input size
        where = images if images.startswith("tfds:") else os.path.abspath(images)
        transform = f"resize {pre.interpolation} to {pre.input_size}/{pre.crop_pct}, centre crop {pre.input_size}"
        sets.append(
            {"source": where, "count": len(names), "size": pre.input_size, "transform": transform}
        )
    return check_parity(
        torch_model,
        conversion.model,
        inputs=inputs,
        tolerance=tolerance,
        input_sets=sets,
        reference=description,
    )


def _seeded(config: ConvMixerConfig, input_size: int) -> tuple:
    """(the seeded batch, at `parity_size`; its entry in the report, saying why when it is
    smaller than the input size)."""
    size = parity_size(config, input_size)
    entry = {"source": "seeded standard normal (seed 0)", "count": SEEDED_BATCH, "size": size}
    if size < input_size:
        entry["size_reason"] = (
            f"not the input size {input_size}: one image's stage outputs there would hold "
            f"{stage_bytes(config, input_size) / MIB:.0f} MiB in the two networks, more than "
            f"parity's {PARITY_BUDGET_BYTES / MIB:.0f} MiB"
        )
    return seeded_inputs(SEEDED_BATCH, size), entry
