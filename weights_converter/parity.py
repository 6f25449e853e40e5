"""Runs the real PyTorch network and the Keras one side by side, stage by stage.

The reference is timm's ConvMixer when timm is installed (timm.create_model for a
released variant, timm's ConvMixer class for any other size), otherwise the paper's
nn.Sequential (`paper_convmixer`). Both run in eval mode on the same inputs; the report
gives logit differences, top-1 agreement, and the difference after the stem and after
every block, naming the first stage that diverges.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

import numpy as np

from convmixer_tf.config import VARIANTS, ConvMixerConfig, stage_layers
from convmixer_tf.errors import BadInput, CheckFailed
from convmixer_tf.export.scores import allowed
from convmixer_tf.facts import facts_of
from weights_converter import layouts

DEFAULT_TOLERANCE = 1e-4
SEEDED_BATCH = 2  # seeded inputs every conversion is checked on


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

    def describe(self) -> str:
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.1%}"
        text = (
            f"parity {'PASSED' if self.passed else 'FAILED'}: max |logit diff| {self.max_abs:.2e} (tolerance "
            f"{self.tolerance:.0e}), max rel {self.max_rel:.2e}, top-1 agreement {top1} on {self.num_inputs} "
            f"inputs; reference {self.reference}"
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


def check_parity(
    torch_model,
    keras_model,
    inputs: Optional[np.ndarray] = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 2,
    image_size: int = 224,
    seed: int = 0,
    input_sets: Optional[List[dict]] = None,
    reference: str = "",
) -> ParityReport:
    """Compares a PyTorch ConvMixer and its Keras conversion on the same NHWC batch.

    Args:
        torch_model: a ConvMixer in any layout the converter reads (timm's, the paper's
            nn.Sequential or one-liner, labml's), weights loaded.
        keras_model: the converted Keras model.
        inputs: NHWC float32 batch in the network's input space; default a seeded
            standard-normal batch of `batch_size` images of `image_size` pixels.
        tolerance: largest allowed absolute difference of the final outputs.

    Example:
        >>> report = check_parity(timm_model, keras_model)  # doctest: +SKIP
        >>> report.passed, report.first_divergent_stage  # doctest: +SKIP
        (True, None)
    """
    if inputs is None:
        inputs = seeded_inputs(batch_size, image_size, seed)
        input_sets = [{"source": f"seeded standard normal (seed {seed})", "count": batch_size}]
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    torch_outs = _torch_stages(torch_model, inputs)
    keras_outs = _keras_stages(keras_model, inputs, len(torch_outs) - 2)
    stages = [
        _diff(name, keras_out, ref, tolerance)
        for (name, ref), keras_out in zip(torch_outs, keras_outs)
    ]
    final = stages[-1]
    final.diverged = final.max_abs > tolerance
    keras_out, torch_out = keras_outs[-1], torch_outs[-1][1]
    top1 = None
    if keras_out.ndim == 2 and keras_out.shape[1] > 1 and facts_of(keras_model).config.num_classes:
        top1 = float(np.mean(keras_out.argmax(1) == torch_out.argmax(1)))
    return ParityReport(
        passed=bool(not final.diverged and np.isfinite(keras_out).all()),
        tolerance=tolerance,
        max_abs=final.max_abs,
        max_rel=final.max_rel,
        top1_agreement=top1,
        num_inputs=int(inputs.shape[0]),
        input_shape=list(inputs.shape[1:]),
        inputs=input_sets or [],
        stages=stages,
        first_divergent_stage=next((s.name for s in stages if s.diverged), None),
        reference=reference,
    )


def _torch_stages(torch_model, inputs) -> list:
    """(name, NHWC output) after the stem, each block, and at the end of the PyTorch model.
    Whatever the layout, each stage ends with a BatchNorm: the stem's, and each block's
    pointwise one; the layout's table says where they sit in `torch_model`."""
    import torch

    layout, depth = layouts.layout_of(torch_model.state_dict())
    table = layouts.modules(layout, depth)
    modules = [("stem", table["stem.2"])] + [
        (f"block{i}", table[f"blocks.{i}.3"]) for i in range(depth)
    ]
    captured = {}
    hooks = [
        torch_model.get_submodule(module).register_forward_hook(
            lambda m, args, out, name=name: captured.__setitem__(
                name, out.detach().numpy().transpose(0, 2, 3, 1).copy()
            )
        )
        for name, module in modules
    ]
    try:
        torch_model.eval()
        with torch.no_grad():
            out = torch_model(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, captured[name]) for name, _ in modules] + [("output", out)]


def _keras_stages(keras_model, inputs, depth) -> list:
    import keras

    layers = stage_layers(depth)
    probe = keras.Model(
        keras_model.input, [keras_model.get_layer(n).output for n in layers] + [keras_model.output]
    )
    return [keras.ops.convert_to_numpy(t) for t in probe(inputs, training=False)]


def _diff(name, value, ref, tolerance) -> StageDiff:
    if value.shape != ref.shape:
        raise ParityError(f"{name}: Keras shape {value.shape} != PyTorch shape {ref.shape}")
    max_abs = float(np.max(np.abs(value.astype(np.float64) - ref))) if value.size else 0.0
    diverged = max_abs > allowed(tolerance, ref) or not np.isfinite(max_abs)
    return StageDiff(name, max_abs, max_abs / allowed(1.0, ref), bool(diverged))


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
    config = conversion.config
    torch_model, description, layout = reference_model(
        config, config.num_classes > 0, conversion.matched_variant
    )
    # the tensors under the reference's own names, loaded strictly
    tensors = layouts.from_canonical(conversion.canonical, layout, config.depth)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    pre = facts_of(conversion.model).preprocessing
    inputs = seeded_inputs(SEEDED_BATCH, pre.input_size)
    sets = [{"source": "seeded standard normal (seed 0)", "count": SEEDED_BATCH}]
    if images:
        from convmixer_tf.images import parse_source, read_images

        pictures, names, _ = read_images(parse_source(images), pre)
        inputs = np.concatenate([inputs, pictures])  # normalised, as the network sees them
        where = images if images.startswith("tfds:") else os.path.abspath(images)
        transform = f"resize {pre.interpolation} to {pre.input_size}/{pre.crop_pct}, centre crop {pre.input_size}"
        sets.append({"source": where, "count": len(names), "transform": transform})
    return check_parity(
        torch_model,
        conversion.model,
        inputs=inputs,
        tolerance=tolerance,
        input_sets=sets,
        reference=description,
    )
