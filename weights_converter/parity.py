"""Runs the real PyTorch network and the Keras one side by side, stage by stage.

The reference is timm's ConvMixer when timm is installed (timm.create_model for a
released variant, timm's ConvMixer class for any other size), otherwise the paper's
nn.Sequential kept in `weights_converter.reference`. Both run in eval mode on the
same inputs; the report gives logit differences, top-1 agreement, and the difference
after the stem and after every block, naming the first stage that diverges.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

from convmixer_tf import contract
from convmixer_tf.cli import CheckFailed
from convmixer_tf.config import VARIANTS, ConvMixerConfig
from weights_converter import mapping

DEFAULT_TOLERANCE = 1e-4


class ParityError(CheckFailed):
    """Keras and PyTorch disagree beyond the tolerance (exit code 1)."""


@dataclasses.dataclass
class StageDiff:
    name: str
    max_abs: float
    max_rel: float  # max |keras - torch| / max(1, max |torch|) over the stage output
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
        verdict = "PASSED" if self.passed else "FAILED"
        top1 = "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.1%}"
        text = (f"parity {verdict}: max |logit diff| {self.max_abs:.2e} (tolerance {self.tolerance:.0e}), "
                f"max rel {self.max_rel:.2e}, top-1 agreement {top1} on {self.num_inputs} inputs; "
                f"reference {self.reference}")
        if self.first_divergent_stage:
            stage = next(s for s in self.stages if s.name == self.first_divergent_stage)
            text += f"; first diverging stage: {stage.name} (max abs diff {stage.max_abs:.3g})"
        return text


def reference_model(config: ConvMixerConfig, include_top: bool = True, variant: Optional[str] = None, *,
                    prefer_timm: bool = True):
    """Builds the PyTorch ConvMixer for `config`; returns (module, description, layout).

    For a released variant the architecture, activation included, is timm's own
    registered model, so a wrong --activation shows up as a parity failure.
    """
    import torch.nn as nn

    num_classes = config.num_classes if include_top else 0
    timm = _import_timm() if prefer_timm else None
    if timm is not None and config.depthwise:
        registered = variant if variant in VARIANTS and VARIANTS[variant].timm_name else None
        if registered:
            model = timm.create_model(VARIANTS[registered].timm_name, pretrained=False, num_classes=num_classes)
            return model.eval(), f"timm.create_model({registered!r}, num_classes={num_classes})", "timm"
        from timm.models.convmixer import ConvMixer

        act = {"gelu": nn.GELU, "relu": nn.ReLU}[config.activation]
        model = ConvMixer(config.dim, config.depth, kernel_size=config.kernel_size, patch_size=config.patch_size,
                          num_classes=num_classes, act_layer=act)
        return model.eval(), f"timm ConvMixer({mapping.describe(config)}, {config.activation})", "timm"
    from weights_converter.reference import paper_convmixer

    model = paper_convmixer(config.dim, config.depth, config.kernel_size, config.patch_size,
                            max(num_classes, 1), config.activation, config.depthwise)
    if not include_top:
        model = nn.Sequential(*list(model)[:-1])
    return model.eval(), f"paper nn.Sequential({mapping.describe(config)}, {config.activation})", "sequential"


def load_reference(torch_model, layout: str, canonical_state_dict, depth: int):
    """Loads canonical numpy tensors into the reference module, strictly."""
    import torch

    sd = mapping.from_canonical(canonical_state_dict, layout, depth)
    torch_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    return torch_model


def seeded_inputs(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised-space NHWC inputs (what the network sees after mean/std)."""
    return np.random.default_rng(seed).standard_normal((batch_size, size, size, 3)).astype(np.float32)


def check_parity(torch_model, keras_model, inputs: Optional[np.ndarray] = None, *,
                 tolerance: float = DEFAULT_TOLERANCE, batch_size: int = 2, image_size: int = 224, seed: int = 0,
                 input_sets: Optional[List[dict]] = None, reference: str = "") -> ParityReport:
    """Compares a PyTorch ConvMixer and its Keras conversion on the same NHWC batch.

    Args:
        torch_model: timm's ConvMixer or the paper's nn.Sequential, weights loaded.
        keras_model: the converted Keras model.
        inputs: NHWC float32 batch in the network's input space; default a seeded
            standard-normal batch of `batch_size` images of `image_size` pixels.
        tolerance: largest allowed absolute difference of the final outputs.

    Example:
        >>> report = check_parity(timm_model, keras_model)  # doctest: +SKIP
        >>> report.passed, report.first_divergent_stage  # doctest: +SKIP
        (True, None)
    """
    import keras
    import torch

    if inputs is None:
        inputs = seeded_inputs(batch_size, image_size, seed)
        input_sets = [{"source": f"seeded standard normal (seed {seed})", "count": batch_size}]
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    stage_modules = _torch_stages(torch_model)
    captured = {}
    hooks = [module.register_forward_hook(_capture(captured, name)) for name, module in stage_modules]
    try:
        torch_model.eval()
        with torch.no_grad():
            torch_out = torch_model(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for hook in hooks:
            hook.remove()

    stage_names = [name for name, _ in stage_modules]
    keras_layers = contract.stage_layers(len(stage_names) - 1)
    outputs = [keras_model.get_layer(n).output for n in keras_layers] + [keras_model.output]
    probe = keras.Model(keras_model.input, outputs)
    keras_outs = [keras.ops.convert_to_numpy(t) for t in probe(inputs, training=False)]

    stages = []
    for name, keras_value in zip(stage_names, keras_outs[:-1]):
        ref = captured[name].transpose(0, 2, 3, 1)
        stages.append(_diff(name, keras_value, ref, tolerance))
    keras_out = keras_outs[-1]
    final = _diff("output", keras_out, torch_out, tolerance)
    final.diverged = final.max_abs > tolerance
    stages.append(final)
    top1 = None
    if keras_out.ndim == 2 and keras_out.shape[1] > 1 and contract.info_of(keras_model).config.num_classes:
        top1 = float(np.mean(keras_out.argmax(1) == torch_out.argmax(1)))
    first = next((s.name for s in stages if s.diverged), None)
    return ParityReport(
        passed=bool(not final.diverged and np.isfinite(keras_out).all()),
        tolerance=tolerance, max_abs=final.max_abs, max_rel=final.max_rel, top1_agreement=top1,
        num_inputs=int(inputs.shape[0]), input_shape=list(inputs.shape[1:]), inputs=input_sets or [],
        stages=stages, first_divergent_stage=first, reference=reference,
    )


def _diff(name, value, ref, tolerance) -> StageDiff:
    if value.shape != ref.shape:
        raise ParityError(f"{name}: Keras shape {value.shape} != PyTorch shape {ref.shape}")
    max_abs = float(np.max(np.abs(value.astype(np.float64) - ref))) if value.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    rel = max_abs / scale
    return StageDiff(name, max_abs, rel, bool(rel > tolerance or not np.isfinite(max_abs)))


def _capture(store, name):
    def hook(module, args, output):
        store[name] = output.detach().numpy()
    return hook


def _torch_stages(torch_model):
    """(name, module) whose outputs match Keras' stem_bn and block{i}_pw_bn."""
    if hasattr(torch_model, "stem") and hasattr(torch_model, "blocks"):
        return [("stem", torch_model.stem)] + [(f"block{i}", b) for i, b in enumerate(torch_model.blocks)]
    modules = list(torch_model)
    depth = sum(1 for m in modules[3:] if type(m).__name__ == "Sequential")
    return [("stem", modules[2])] + [(f"block{i}", modules[3 + i]) for i in range(depth)]


def _import_timm():
    try:
        import timm
    except Exception:  # timm missing, or torchvision broken beside this torch build
        return None
    return timm
