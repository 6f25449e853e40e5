"""Key layouts -> one canonical layout, config from tensor shapes, and THE table.

Every layout is first renamed to the canonical one (timm's names), then one
declarative table, generated from the config by a loop, says for every Keras weight
which canonical key fills it and through which transform. Conversion in both
directions reads that table and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from convmixer_tf import contract
from convmixer_tf.config import VARIANTS, ConvMixerConfig
from convmixer_tf.errors import BadInput

LAYOUTS = ("timm", "sequential")
IGNORED_SUFFIXES = (".num_batches_tracked",)  # BatchNorm bookkeeping, not a weight


class MappingError(BadInput):
    """The tensors do not form a ConvMixer checkpoint (bad input: exit code 2)."""


# --- transforms: torch tensor -> Keras variable, and back -------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_keras: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


TRANSFORMS = {
    "identity": Transform("identity", lambda a: a, lambda a: a),
    # Conv2d (O, I, kh, kw) <-> Conv2D (kh, kw, I, O)
    "conv": Transform("conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # depthwise Conv2d (C, 1, k, k) <-> DepthwiseConv2D (k, k, C, 1)
    "depthwise": Transform(
        "depthwise", lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1)
    ),
    # Linear (out, in) <-> Dense (in, out)
    "linear": Transform("linear", lambda a: a.T, lambda a: a.T),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One Keras weight <- one canonical torch key, through one transform."""

    layer: str
    weight: str  # Keras attribute: kernel, bias, gamma, beta, moving_mean, moving_variance
    key: str
    transform: str


def weight_table(config: ConvMixerConfig, include_top: bool = True) -> List[Row]:
    """The declarative mapping for `config`: one row per Keras weight."""

    def conv(layer, key, transform="conv"):
        return [
            Row(layer, "kernel", f"{key}.weight", transform),
            Row(layer, "bias", f"{key}.bias", "identity"),
        ]

    def bn(layer, key):
        # PyTorch weight/bias/running_mean/running_var == Keras gamma/beta/moving_mean/moving_variance.
        pairs = (
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        )
        return [Row(layer, w, f"{key}.{t}", "identity") for w, t in pairs]

    rows = conv(contract.STEM_CONV, "stem.0") + bn(contract.STEM_BN, "stem.2")
    spatial = "depthwise" if config.depthwise else "conv"
    for i in range(config.depth):
        layer = functools.partial(contract.block_layer, i)
        rows += conv(layer("dw_conv"), f"blocks.{i}.0.fn.0", spatial)
        rows += bn(layer("dw_bn"), f"blocks.{i}.0.fn.2")
        rows += conv(layer("pw_conv"), f"blocks.{i}.1")
        rows += bn(layer("pw_bn"), f"blocks.{i}.3")
    if include_top:
        rows += [
            Row(contract.HEAD, "kernel", "head.weight", "linear"),
            Row(contract.HEAD, "bias", "head.bias", "identity"),
        ]
    return rows


# --- layouts ---------------------------------------------------------------------


def detect_layout(keys) -> str:
    """'timm' (stem./blocks./head.) or 'sequential' (the paper's nn.Sequential: 0., 2., 3.0.fn.0., ...)."""
    keys = [k for k in keys if not k.endswith(IGNORED_SUFFIXES)]
    if any(k.startswith(("stem.", "blocks.")) for k in keys):
        return "timm"
    if keys and all(re.match(r"^\d+\.", k) for k in keys) and any(k.startswith("0.") for k in keys):
        return "sequential"
    sample = ", ".join(sorted(keys)[:5])
    raise MappingError(
        f"not a ConvMixer checkpoint: keys match neither timm's layout (stem.0.weight, blocks.0...) "
        f"nor the paper's nn.Sequential (0.weight, 3.0.fn.0.weight...); first keys: {sample}"
    )


def _sequential_depth(keys) -> int:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^(\d+)\.0\.fn\.", k))}
    return len(blocks)


def to_canonical(
    state_dict: Dict[str, np.ndarray], layout: Optional[str] = None
) -> Tuple[Dict[str, np.ndarray], str]:
    """Renames `state_dict` to timm's keys; returns (renamed dict, layout it came in)."""
    layout = layout or detect_layout(state_dict)
    if layout == "timm":
        return dict(state_dict), layout
    if layout != "sequential":
        raise MappingError(f"unknown layout {layout!r}; allowed values: {', '.join(LAYOUTS)}")
    depth = _sequential_depth(state_dict)
    out = {}
    for key, value in state_dict.items():
        index, _, rest = key.partition(".")
        n = int(index) if index.isdigit() else -1
        if n in (0, 2):
            new = f"stem.{n}.{rest}"
        elif 3 <= n < 3 + depth:
            new = f"blocks.{n - 3}.{rest}"
        elif n == depth + 5:  # after the blocks: pool, flatten, then Linear
            new = f"head.{rest}"
        else:
            new = key  # left as it is: reported as unexpected
        out[new] = value
    return out, layout


def from_canonical(
    state_dict: Dict[str, np.ndarray], layout: str, depth: int
) -> Dict[str, np.ndarray]:
    """Renames canonical (timm) keys to `layout`."""
    if layout == "timm":
        return dict(state_dict)
    if layout != "sequential":
        raise ValueError(f"unknown layout {layout!r}; allowed values: {', '.join(LAYOUTS)}")
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            new = key[len("stem.") :]
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            new = f"{int(i) + 3}.{rest}"
        elif key.startswith("head."):
            new = f"{depth + 5}.{key[len('head.') :]}"
        else:
            new = key
        out[new] = value
    return out


# --- config from shapes ----------------------------------------------------------


def check_finite(state_dict: Dict[str, np.ndarray]) -> None:
    """MappingError (exit 2) naming the first tensor that holds NaN or Inf: such weights
    are damaged input, not a parity question."""
    for key, value in state_dict.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            kinds = "/".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(value).any())
            raise MappingError(
                f"tensor {key!r} holds {bad} non-finite value(s) ({kinds}): the checkpoint is damaged "
                "or its training diverged; nothing was converted"
            )


def _need(sd, key):
    if key not in sd:
        raise MappingError(f"missing key {key!r}: the checkpoint is incomplete or not a ConvMixer")
    return sd[key]


def infer_config(
    state_dict: Dict[str, np.ndarray], activation: Optional[str] = None
) -> ConvMixerConfig:
    """Reads dim, depth, kernel, patch, classes and depthwise-or-not from tensor shapes.

    The activation cannot be read from weights: it comes from `activation`, else from
    the released variant the shapes match (ReLU for convmixer_768_32), else GELU.

    Example:
        >>> cfg = infer_config(load_state_dict("convmixer_768_32.pth"))  # doctest: +SKIP
        >>> cfg.dim, cfg.depth, cfg.activation  # doctest: +SKIP
        (768, 32, 'relu')
    """
    sd, _ = to_canonical(state_dict)
    stem = _need(sd, "stem.0.weight")
    if stem.ndim != 4 or stem.shape[2] != stem.shape[3]:
        raise MappingError(f"stem.0.weight has shape {tuple(stem.shape)}, expected (dim, 3, p, p)")
    if stem.shape[1] != 3:
        raise MappingError(
            f"stem.0.weight has {stem.shape[1]} input channels; only 3 (RGB) is supported"
        )
    dim, patch = int(stem.shape[0]), int(stem.shape[2])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if depth == 0:
        raise MappingError(
            "missing key 'blocks.0.0.fn.0.weight': the checkpoint has no mixer blocks"
        )
    spatial = _need(sd, "blocks.0.0.fn.0.weight")
    if spatial.ndim != 4 or spatial.shape[0] != dim or spatial.shape[1] not in (1, dim):
        raise MappingError(
            f"blocks.0.0.fn.0.weight has shape {tuple(spatial.shape)}, expected ({dim}, 1, k, k) "
            f"(depthwise) or ({dim}, {dim}, k, k)"
        )
    depthwise = spatial.shape[1] == 1 and dim > 1
    head = sd.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0  # 0: no head
    base = ConvMixerConfig(
        dim=dim,
        depth=depth,
        kernel_size=int(spatial.shape[2]),
        patch_size=patch,
        num_classes=num_classes,
        depthwise=depthwise,
    )
    match = match_variant(base)
    if activation is None:
        activation = VARIANTS[match].config.activation if match else "gelu"
    return base.replace(activation=activation)


def has_head(state_dict) -> bool:
    """timm models made with num_classes=0 carry no head."""
    sd, _ = to_canonical(state_dict)
    return "head.weight" in sd or "head.bias" in sd


def architecture(config: ConvMixerConfig) -> tuple:
    """What shapes can tell: everything but the activation and the class count."""
    return (config.dim, config.depth, config.kernel_size, config.patch_size, config.depthwise)


def match_variant(config: ConvMixerConfig) -> Optional[str]:
    """The name of the table variant whose architecture (activation aside) is `config`'s."""
    for name, variant in VARIANTS.items():
        if architecture(variant.config) == architecture(config):
            return name
    return None


def plan(state_dict: Dict[str, np.ndarray], config: ConvMixerConfig, include_top: bool = True):
    """Checks every row of the table against the tensors before anything is copied; returns
    the rows. Raises MappingError naming the first missing key, wrong shape or unexpected key."""
    rows = weight_table(config, include_top)
    wanted = {row.key for row in rows}
    missing = [row.key for row in rows if row.key not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MappingError(f"missing key {missing[0]!r}{more} for a {config.describe()}")
    for row in rows:
        got = tuple(state_dict[row.key].shape)
        expected = expected_torch_shape(row, config)
        if got != expected:
            raise MappingError(
                f"wrong shape for {row.key!r}: {got}, expected {expected} for a {config.describe()}"
            )
    unused = sorted(k for k in state_dict if k not in wanted and not k.endswith(IGNORED_SUFFIXES))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise MappingError(
            f"unexpected key {unused[0]!r}{more}: not part of a ConvMixer-{config.dim}/{config.depth}"
        )
    return rows


def expected_torch_shape(row: Row, config: ConvMixerConfig) -> tuple:
    d = config.dim
    k = config.kernel_size
    p = config.patch_size
    if row.key == "stem.0.weight":
        return (d, 3, p, p)
    if row.key.endswith(".0.fn.0.weight"):
        return (d, 1, k, k) if config.depthwise else (d, d, k, k)
    if row.key.startswith("blocks.") and row.key.endswith(".1.weight"):
        return (d, d, 1, 1)
    if row.key == "head.weight":
        return (config.num_classes, d)
    if row.key == "head.bias":
        return (config.num_classes,)
    return (d,)
