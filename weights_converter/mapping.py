"""Config from tensor shapes, and THE table.

Every layout is first renamed to the canonical one (timm's names, `layouts`), then one
declarative table, generated from the config by a loop, says for every Keras weight
which canonical key fills it and through which transform. Conversion in both
directions reads that table and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional

import numpy as np

from convmixer_tf.config import HEAD, STEM_BN, STEM_CONV, VARIANTS, ConvMixerConfig, block_layer
from weights_converter.layouts import (
    IGNORED_SUFFIXES,
    MappingError,
    depth_of,
    original_key,
    shown,
    to_canonical,
)

# --- transforms: torch tensor -> Keras variable, and back -------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    to_keras: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


TRANSFORMS = {
    "identity": Transform(lambda a: a, lambda a: a),
    # Conv2d (O, I, kh, kw) <-> Conv2D (kh, kw, I, O)
    "conv": Transform(lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # depthwise Conv2d (C, 1, k, k) <-> DepthwiseConv2D (k, k, C, 1)
    "depthwise": Transform(lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1)),
    # Linear (out, in) <-> Dense (in, out)
    "linear": Transform(lambda a: a.T, lambda a: a.T),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One Keras weight <- one canonical torch key of `shape`, through one transform."""

    layer: str
    weight: str  # Keras attribute: kernel, bias, gamma, beta, moving_mean, moving_variance
    key: str
    transform: str
    shape: tuple  # the torch tensor's


def weight_table(config: ConvMixerConfig, include_top: bool = True) -> List[Row]:
    """The declarative mapping for `config`: one row per Keras weight."""
    d = config.dim
    k = config.kernel_size

    def kernel_bias(layer, key, shape, transform="conv"):
        return [
            Row(layer, "kernel", f"{key}.weight", transform, shape),
            Row(layer, "bias", f"{key}.bias", "identity", shape[:1]),
        ]

    def bn(layer, key):
        # PyTorch weight/bias/running_mean/running_var == Keras gamma/beta/moving_mean/moving_variance.
        pairs = (
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        )
        return [Row(layer, w, f"{key}.{t}", "identity", (d,)) for w, t in pairs]

    patch = config.patch_size
    rows = kernel_bias(STEM_CONV, "stem.0", (d, 3, patch, patch)) + bn(STEM_BN, "stem.2")
    spatial = (d, 1, k, k) if config.depthwise else (d, d, k, k)
    transform = "depthwise" if config.depthwise else "conv"
    for i in range(config.depth):
        layer = functools.partial(block_layer, i)
        rows += kernel_bias(layer("dw_conv"), f"blocks.{i}.0.fn.0", spatial, transform)
        rows += bn(layer("dw_bn"), f"blocks.{i}.0.fn.2")
        rows += kernel_bias(layer("pw_conv"), f"blocks.{i}.1", (d, d, 1, 1))
        rows += bn(layer("pw_bn"), f"blocks.{i}.3")
    if include_top:
        rows += kernel_bias(HEAD, "head", (config.num_classes, d), "linear")
    return rows


# --- config from shapes ----------------------------------------------------------


def check_finite(state_dict: Dict[str, np.ndarray]) -> None:
    """MappingError (exit 2) naming the first tensor that holds NaN or Inf: such weights
    are damaged input, not a parity question."""
    for key, value in state_dict.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            kinds = "/".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(value).any())
            raise MappingError(
                f"tensor {shown(key)} holds {bad} non-finite value(s) ({kinds}): the checkpoint is damaged "
                "or its training diverged; nothing was converted"
            )


def infer_config(
    state_dict: Dict[str, np.ndarray],
    activation: Optional[str] = None,
    *,
    layout: Optional[str] = None,
) -> ConvMixerConfig:
    """Reads dim, depth, kernel, patch, classes and depthwise-or-not from tensor shapes.

    The activation cannot be read from weights: it comes from `activation`, else from
    the released variant the shapes match (ReLU for convmixer_768_32), else GELU.

    Example:
        >>> cfg = infer_config(load_state_dict("convmixer_768_32.pth"))  # doctest: +SKIP
        >>> cfg.dim, cfg.depth, cfg.activation  # doctest: +SKIP
        (768, 32, 'relu')
    """
    sd, layout = to_canonical(state_dict, layout)
    depth = depth_of(sd, "timm")  # the renamed blocks: as many as the layout's

    def need(key, wanted, fits=lambda shape: True):
        """The shape of `key`: (n, c, k, k), as `fits` wants it; MappingError otherwise."""
        named = shown(original_key(key, layout, depth))
        if key not in sd:
            raise MappingError(
                f"missing key {named}: the checkpoint is incomplete or not a ConvMixer"
            )
        shape = sd[key].shape
        if len(shape) != 4 or shape[2] != shape[3] or not fits(shape):
            raise MappingError(f"{named} has shape {tuple(shape)}, expected {wanted}")
        return shape

    dim, channels, patch, _ = need("stem.0.weight", "(dim, 3, p, p)")
    if channels != 3:
        raise MappingError(
            f"{shown(original_key('stem.0.weight', layout, depth))} has {channels} input "
            "channels; only 3 (RGB) is supported"
        )
    if depth == 0:
        raise MappingError("the checkpoint has no mixer blocks: it is not a ConvMixer")
    wanted = f"({dim}, 1, k, k) (depthwise) or ({dim}, {dim}, k, k)"
    spatial = need("blocks.0.0.fn.0.weight", wanted, lambda s: s[0] == dim and s[1] in (1, dim))
    head = shown(original_key("head.weight", layout, depth))
    num_classes = _class_count(sd.get("head.weight"), dim, head)
    base = ConvMixerConfig(
        dim=int(dim),
        depth=depth,
        kernel_size=int(spatial[2]),
        patch_size=int(patch),
        num_classes=num_classes,
        depthwise=bool(spatial[1] == 1 and dim > 1),
    )
    match = match_variant(base)
    if activation is None:
        activation = VARIANTS[match].config.activation if match else "gelu"
    return base.replace(activation=activation)


def _class_count(head, dim: int, named: str) -> int:
    """The classes of a head whose weight (`named`) is `head`: (classes, dim); 0 without one."""
    if head is None:
        return 0
    if head.ndim != 2:
        raise MappingError(f"{named} has shape {tuple(head.shape)}, expected (classes, {dim})")
    return int(head.shape[0])


def has_head(canonical: Dict[str, np.ndarray]) -> bool:
    """Whether canonical tensors hold a classifier head (timm models made with
    num_classes=0 carry none)."""
    return "head.weight" in canonical or "head.bias" in canonical


def architecture(config: ConvMixerConfig) -> tuple:
    """What shapes can tell: everything but the activation and the class count."""
    return (config.dim, config.depth, config.kernel_size, config.patch_size, config.depthwise)


def match_variant(config: ConvMixerConfig) -> Optional[str]:
    """The name of the table variant whose architecture (activation aside) is `config`'s."""
    for name, variant in VARIANTS.items():
        if architecture(variant.config) == architecture(config):
            return name
    return None


def plan(
    state_dict: Dict[str, np.ndarray],
    config: ConvMixerConfig,
    include_top: bool = True,
    *,
    layout: str = "timm",
):
    """Checks every row of the table against canonical tensors before anything is copied;
    returns the rows. Raises MappingError naming, as the `layout` checkpoint names it, the
    first missing key, wrong shape or unexpected key."""

    def named(key):
        return shown(original_key(key, layout, config.depth))

    rows = weight_table(config, include_top)
    wanted = {row.key for row in rows}
    missing = [row.key for row in rows if row.key not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MappingError(f"missing key {named(missing[0])}{more} for a {config.describe()}")
    for row in rows:
        if state_dict[row.key].dtype.kind != "f":
            raise MappingError(
                f"{named(row.key)} holds {state_dict[row.key].dtype}, not floating-point weights"
            )
        got = tuple(state_dict[row.key].shape)
        if got != row.shape:
            raise MappingError(
                f"wrong shape for {named(row.key)}: {got}, expected {row.shape} for a "
                f"{config.describe()}"
            )
    unused = sorted(k for k in state_dict if k not in wanted and not k.endswith(IGNORED_SUFFIXES))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise MappingError(
            f"unexpected key {named(unused[0])}{more}: not part of a "
            f"ConvMixer-{config.dim}/{config.depth}"
        )
    return rows
