"""ConvMixer configurations: the architecture and the names of its layers, the input
preprocessing (and its maths), and one table of named variants.

Variants are data. The released ImageNet models keep timm's names (which is what
checkpoints and users call them); the CIFAR-10 rows are the paper's small models.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Tuple

from convmixer_tf.errors import BadInput

ACTIVATIONS = ("gelu", "relu")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "area")
# The largest size the shorter side may be resized to (input_size / crop_pct): an integer
# that a float still holds exactly. No executor allocates it; they resize the crop alone.
MAX_RESIZE = 2**53
# How far from a sample the widest of those filters reads, in output pixels (bicubic's 2).
FILTER_REACH = 2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
# Raw RGB pixels run from 0 to PIXEL_MAX: what apps hand over and what every graph here
# that "takes raw RGB" expects.
PIXEL_MAX = 255.0
# The largest input side accepted anywhere (pixels): a larger one is refused before any
# memory is reserved for it (the released models take 224).
MAX_INPUT_SIZE = 4096


# Layer names (a mapping table, a parity probe or an exporter finds layers by these)
INPUT = "images"
PREPROCESSING = "preprocessing"
STEM_CONV = "stem_conv"
STEM_ACT = "stem_act"
STEM_BN = "stem_bn"
POOLING_LAYERS = {"avg": "avg_pool", "max": "max_pool"}
HEAD = "head"
BLOCK_PARTS = ("dw_conv", "dw_act", "dw_bn", "add", "pw_conv", "pw_act", "pw_bn")


def block_layer(i: int, part: str) -> str:
    """The name of part `part` (one of BLOCK_PARTS) of mixer block `i` (from 0, like timm)."""
    if part not in BLOCK_PARTS:
        raise ValueError(f"part must be one of {BLOCK_PARTS}, got {part!r}")
    return f"block{i}_{part}"


def stage_layers(depth: int) -> list:
    """The layers whose outputs are the network's stages: the stem and each block."""
    return [STEM_BN] + [block_layer(i, "pw_bn") for i in range(depth)]


@dataclasses.dataclass(frozen=True)
class ConvMixerConfig:
    """Architecture of one ConvMixer-h/d.

    Args:
        dim: channels h, constant through the network.
        depth: number of mixer blocks d.
        kernel_size: spatial (depthwise) kernel k.
        patch_size: stem kernel and stride p.
        activation: "gelu" (exact, erf form) or "relu".
        num_classes: classifier outputs; 0 for a network without a classifier head.
        depthwise: True for the released models (groups=dim); False for the network
            printed in the paper's code listing, which has a full k x k conv there.
    """

    dim: int
    depth: int
    kernel_size: int = 9
    patch_size: int = 7
    activation: str = "gelu"
    num_classes: int = 1000
    depthwise: bool = True

    def __post_init__(self):
        for field in ("dim", "depth", "kernel_size", "patch_size", "num_classes"):
            value = getattr(self, field)
            least, words = (
                (0, "an integer >= 0") if field == "num_classes" else (1, "a positive integer")
            )
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise BadInput(f"{field} must be {words}, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise BadInput(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def replace(self, **changes) -> "ConvMixerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """ "ConvMixer-768/32 k7 p7" (and what sets a non-depthwise network apart)."""
        kind = "" if self.depthwise else ", full (non-depthwise) k x k conv"
        return f"ConvMixer-{self.dim}/{self.depth} k{self.kernel_size} p{self.patch_size}{kind}"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_size(field: str, value) -> int:
    """`value` as an input side: an integer from 1 to MAX_INPUT_SIZE; BadInput naming `field`."""
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integer or not 1 <= value <= MAX_INPUT_SIZE:
        raise BadInput(f"{field} must be an integer from 1 to {MAX_INPUT_SIZE}, got {value!r}")
    return value


def check_numbers(field: str, values, *, positive: bool = False) -> tuple:
    """`values` as 3 finite numbers (> 0 with `positive`); BadInput naming `field`."""
    ok = isinstance(values, (tuple, list)) and len(values) == 3 and all(map(_is_number, values))
    if not ok or (positive and min(values) <= 0):
        wanted = "3 finite numbers > 0" if positive else "3 finite numbers"
        raise BadInput(f"{field} must be {wanted}, got {values!r}")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are made (timm's pretrained cfg): the evaluation transform
    (resize by crop_pct, centre crop) and the normalisation (pixels / PIXEL_MAX - mean) / std.

    The normalisation is defined here and nowhere else: the model's layer, evaluation,
    calibration, exported graphs, TFLite metadata and MediaPipe's pixels all call these
    methods.
    """

    input_size: int = 224
    crop_pct: float = 0.96
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "input_size", int(check_size("input_size", self.input_size)))
        object.__setattr__(self, "mean", check_numbers("mean", self.mean))
        object.__setattr__(self, "std", check_numbers("std", self.std, positive=True))
        if not _is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise BadInput(f"crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if self.input_size / self.crop_pct >= MAX_RESIZE:
            raise BadInput(
                f"crop_pct {self.crop_pct!r} is too small: input_size / crop_pct must stay below "
                f"{MAX_RESIZE} (2**53)"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise BadInput(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def eval_crop(self, width: int, height: int) -> "EvalCrop":
        """timm's evaluation transform of a `width` x `height` image, as numbers: torchvision's
        Resize(floor(input_size / crop_pct)) (the shorter side to that size, the longer one
        in proportion, truncated), then CenterCrop(input_size) (offsets rounded half to even,
        as Python's round)."""
        scale_size = math.floor(self.input_size / self.crop_pct)
        if width <= height:
            resized = (scale_size, int(scale_size * height / width))
        else:
            resized = (int(scale_size * width / height), scale_size)
        left = int(round((resized[0] - self.input_size) / 2.0))
        top = int(round((resized[1] - self.input_size) / 2.0))
        return EvalCrop(
            source=(width, height), resized=resized, corner=(left, top), size=self.input_size
        )

    def for_input(self, input_shape) -> "Preprocessing":
        """This preprocessing at the size a fixed square input (H, W, ...) sets; for any other
        input shape, unchanged."""
        height, width = tuple(input_shape)[:2]
        if height and height == width:
            return self.replace(input_size=int(height))
        return self

    def scale_offset(self) -> Tuple[tuple, tuple]:
        """The normalisation as one multiply-add per channel: raw * scale + offset."""
        scale = tuple(1.0 / (PIXEL_MAX * s) for s in self.std)
        return scale, tuple(-m / s for m, s in zip(self.mean, self.std))

    def normalize(self, pixels):
        """Raw RGB (numpy or TensorFlow, channels last) -> what the network sees."""
        scale, offset = self.scale_offset()
        return pixels * scale + offset

    def denormalize(self, x):
        """The inverse: normalised input -> raw RGB pixel values (not rounded)."""
        scale, offset = self.scale_offset()
        return (x - offset) / scale

    def pixel_mean_std(self) -> Tuple[tuple, tuple]:
        """Mean and std in pixel units, for a client that computes (pixel - mean) / std."""
        return tuple(PIXEL_MAX * m for m in self.mean), tuple(PIXEL_MAX * s for s in self.std)

    @staticmethod
    def mean_std_of(scale, offset) -> dict:
        """{"mean", "std"} of a raw * scale + offset normalisation (a saved layer's weights)."""
        std = tuple(1.0 / (PIXEL_MAX * float(s)) for s in scale)
        return {"mean": tuple(-float(o) * s for o, s in zip(offset, std)), "std": std}


@dataclasses.dataclass(frozen=True)
class EvalCrop:
    """The evaluation transform of one image size (`Preprocessing.eval_crop`): resize the
    `source` (width, height) to `resized`, then keep the `size` x `size` square whose
    top-left corner is `corner` (left, top). `box` is that square in source pixels, so that
    an executor can resize the square alone, and `window` the source pixels it reads."""

    source: Tuple[int, int]
    resized: Tuple[int, int]
    corner: Tuple[int, int]
    size: int

    def scale(self) -> Tuple[float, float]:
        """Resized pixels per source pixel, (x, y)."""
        return self.resized[0] / self.source[0], self.resized[1] / self.source[1]

    def box(self) -> Tuple[float, float, float, float]:
        """(left, top, right, bottom) of the crop in source pixels (fractional; within the
        source, which rounding could otherwise pass by a hair at its edge)."""
        (left, top), (sx, sy) = self.corner, self.scale()
        right = min(self.source[0], (left + self.size) / sx)
        return left / sx, top / sy, right, min(self.source[1], (top + self.size) / sy)

    def window(self) -> Tuple[int, int, int, int]:
        """(left, top, right, bottom): the source pixels that the crop's resized pixels read,
        with a margin for the widest filter here (bicubic reaches 2 pixels either side of a
        sample, 2 source pixels per resized pixel's width when shrinking) and 1 for rounding."""
        left, top, right, bottom = self.box()
        reach_x, reach_y = (FILTER_REACH * max(1.0, 1.0 / s) + 1 for s in self.scale())
        return (
            max(0, math.floor(left - reach_x)),
            max(0, math.floor(top - reach_y)),
            min(self.source[0], math.ceil(right + reach_x)),
            min(self.source[1], math.ceil(bottom + reach_y)),
        )


@dataclasses.dataclass(frozen=True)
class Variant:
    config: ConvMixerConfig
    preprocessing: Preprocessing
    description: str
    timm_name: Optional[str] = None
    hub_id: Optional[str] = None  # where its released weights are: hf-hub:<hub_id>


_IMAGENET = Preprocessing()
_CIFAR10 = Preprocessing(
    input_size=32, crop_pct=1.0, interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD
)

VARIANTS = {
    # Released ImageNet-1k models (timm names; 81.37 / 80.16 / 76.94 top-1).
    "convmixer_1536_20": Variant(
        ConvMixerConfig(dim=1536, depth=20, kernel_size=9, patch_size=7),
        _IMAGENET,
        "ImageNet-1k, 51.6M params, 81.37% top-1",
        "convmixer_1536_20",
        "timm/convmixer_1536_20.in1k",
    ),
    # The only released model with ReLU; nothing in its weights says so.
    "convmixer_768_32": Variant(
        ConvMixerConfig(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu"),
        _IMAGENET,
        "ImageNet-1k, 21.1M params, 80.16% top-1",
        "convmixer_768_32",
        "timm/convmixer_768_32.in1k",
    ),
    "convmixer_1024_20_ks9_p14": Variant(
        ConvMixerConfig(dim=1024, depth=20, kernel_size=9, patch_size=14),
        _IMAGENET,
        "ImageNet-1k, 24.4M params, 76.94% top-1",
        "convmixer_1024_20_ks9_p14",
        "timm/convmixer_1024_20_ks9_p14.in1k",
    ),
    # CIFAR-10 models of the paper (convmixer-cifar10 recipe: 92.6% in 25 epochs).
    "convmixer_256_8": Variant(
        ConvMixerConfig(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10),
        _CIFAR10,
        "CIFAR-10, ConvMixer-256/8 k5 p2 (paper's recipe)",
    ),
    "convmixer_256_16": Variant(
        ConvMixerConfig(dim=256, depth=16, kernel_size=9, patch_size=1, num_classes=10),
        _CIFAR10,
        "CIFAR-10, ConvMixer-256/16 k9 p1",
    ),
}


def list_variants() -> list:
    """Names accepted by `create_model`, in table order."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """The table row for `name`; ValueError naming the allowed values otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise BadInput(f"unknown variant {name!r}; allowed values: {', '.join(VARIANTS)}") from None
