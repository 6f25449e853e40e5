"""The inference graph that exporters emit, written with plain TensorFlow ops.

Exporting the Keras model as it is gives correct files that are slow or broken on
some runtimes (see the notes at each choice below), so TFLite and ONNX files are
made from this graph instead. It takes its weights from a Keras ConvMixer, and every
file made from it is run in its own runtime and compared with the Keras model.
"""

from __future__ import annotations

import collections
import math
from typing import List

import numpy as np

from convmixer_tf.config import HEAD, STEM_BN, STEM_CONV, block_layer
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import facts_of

# LiteRT's XNNPACK runs a depthwise kernel of up to 9 taps in one pass; 10-25 taps take
# a slower kernel, and more than 25 a multi-pass one that is slower still. Kernels
# larger than 5x5 are therefore emitted as tiles of at most MAX_TILE_TAPS taps each
# (bench_export and the README give the timings).
FAST_DEPTHWISE_MAX = 5
MAX_TILE_TAPS = 9


# A convolution's weights, and what is left of a BatchNorm after its activation: x * scale +
# shift (None: skipped). With a tile plan, a block's dw.kernel is [group][tile] kernels and
# its dw.bias and dw_bn.scale are per channel group.
Conv = collections.namedtuple("Conv", "kernel bias")
Affine = collections.namedtuple("Affine", "scale shift")
Block = collections.namedtuple("Block", "dw dw_bn pw pw_bn")
# The forms each piece of the graph can take (see InferenceGraph).
FORMS = {"depthwise": ("native", "tiled"), "gelu": ("builtin", "erf"), "affine": ("ops", "conv")}


def _bn_affine(layer) -> Affine:
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in layer.get_weights())
    scale = gamma / np.sqrt(var + layer.epsilon)
    return Affine(scale.astype(np.float32), (beta - mean * scale).astype(np.float32))


def _conv(layer) -> Conv:
    return Conv(*(np.asarray(w, np.float32) for w in layer.get_weights()))


class InferenceGraph:
    """A ConvMixer forward pass as a tf.function over constants.

    Args:
        model: a Keras ConvMixer built by convmixer_tf, carrying its facts; a model that
            takes raw RGB gives a graph that does (its normalisation as one multiply-add).
        depthwise: "native" (one DEPTHWISE_CONV_2D) or "tiled" (k x k, k > 5, as a sum
            of the small tiles of `tile_plan(k)`, for LiteRT/XNNPACK).
        channel_groups: with "tiled", the depthwise branch (tiles, activation, BatchNorm)
            runs on this many channel slices one after the other, each small enough to
            stay in a core's cache through its tile sums, then joins them.
        tile_taps: the most taps of one tile (see `tile_plan`).
        gelu: "builtin" (tf.nn.gelu exact, which TFLite maps to its GELU op) or "erf"
            (0.5 x (1 + erf(x / sqrt 2)); TF's exact gelu lowers to Erfc, which
            tf2onnx cannot convert).
        affine: how the per-channel scale/shift left of a BatchNorm is written: "ops"
            (Mul / Add) or "conv" (a 1x1 depthwise conv with bias). onnxruntime keeps
            a 1x1 grouped Conv in its blocked NCHWc layout and fuses the residual Add into
            it, while a broadcast Add sends every block back to NCHW and out again.
        probabilities: end in softmax (unless the head already does).
    """

    def __init__(
        self,
        model,
        *,
        depthwise: str = "native",
        gelu: str = "builtin",
        affine: str = "ops",
        channel_groups: int = 1,
        tile_taps: int = MAX_TILE_TAPS,
        probabilities: bool = False,
    ):
        _check_forms(depthwise=depthwise, gelu=gelu, affine=affine)
        facts = facts_of(model)
        self.config = facts.config
        self.pooling = facts.pooling
        self.depthwise = depthwise
        self.gelu = gelu
        self.affine = affine
        if channel_groups < 1 or self.config.dim % channel_groups:
            raise ValueError(
                f"channel_groups must divide the width {self.config.dim}, got {channel_groups}"
            )
        if facts.classifier_activation not in (None, "linear", "softmax"):
            raise BadInput(
                f"classifier activation {facts.classifier_activation!r} is not exportable"
            )
        self.pre = None
        if facts.raw_rgb:
            self.pre = Affine(
                *(np.asarray(v, np.float32) for v in facts.preprocessing.scale_offset())
            )
        self._read_weights(model)
        self.softmax = self.head is not None and (
            probabilities or facts.classifier_activation == "softmax"
        )
        self._fold_batchnorm()
        self.plan = None
        large = self.config.kernel_size > FAST_DEPTHWISE_MAX
        if self.depthwise == "tiled" and self.config.depthwise and large:
            self.plan = tile_plan(self.config.kernel_size, tile_taps)
            self.blocks = [_tiled(block, self.plan, channel_groups) for block in self.blocks]
        self._to_variables()

    def _read_weights(self, model):
        """The stem, blocks and head of `model` as numpy weights (BatchNorms as affines)."""
        layer = {layer.name: layer for layer in model.layers}
        self.stem = _conv(layer[STEM_CONV])
        self.stem_bn = _bn_affine(layer[STEM_BN])
        self.blocks = [
            Block(
                _conv(layer[block_layer(i, "dw_conv")]),
                _bn_affine(layer[block_layer(i, "dw_bn")]),
                _conv(layer[block_layer(i, "pw_conv")]),
                _bn_affine(layer[block_layer(i, "pw_bn")]),
            )
            for i in range(self.config.depth)
        ]
        self.head = _conv(layer[HEAD]) if self.config.num_classes else None

    def _fold_batchnorm(self):
        """Moves BatchNorm arithmetic into neighbouring convolutions where that is exact.

        Each BatchNorm (after its activation) is x * s + t. Two rewrites are exact:
        - the depthwise branch's shift t only reaches the 1x1 conv (through the residual
          sum), and pw(x + r + t) = pw(x + r) + W^T t: it moves into the 1x1 bias;
        - ReLU is positively homogeneous, relu(z) * s = relu(s * z) for s > 0: when every
          channel's s is positive, the scale moves into the conv weights and bias.
        Fewer elementwise passes over the activations; every file is still checked
        against the Keras model.
        """
        relu = self.config.activation == "relu"

        def scale_into(conv: Conv, bn: Affine, channel_axis: int):
            if not relu or not np.all(bn.scale > 0):
                return conv, bn
            shape = [1] * conv.kernel.ndim
            shape[channel_axis] = -1
            scale = bn.scale.astype(np.float64)
            return (
                Conv(
                    (conv.kernel.astype(np.float64) * scale.reshape(shape)).astype(np.float32),
                    (conv.bias.astype(np.float64) * scale).astype(np.float32),
                ),
                Affine(None, bn.shift),
            )

        self.stem, self.stem_bn = scale_into(self.stem, self.stem_bn, 3)
        depthwise_axis = 2 if self.config.depthwise else 3
        for i, b in enumerate(self.blocks):
            moved = b.dw_bn.shift.astype(np.float64) @ b.pw.kernel[0, 0].astype(np.float64)
            pw = Conv(b.pw.kernel, (b.pw.bias.astype(np.float64) + moved).astype(np.float32))
            dw, dw_bn = scale_into(b.dw, Affine(b.dw_bn.scale, None), depthwise_axis)
            pw, pw_bn = scale_into(pw, b.pw_bn, 3)
            self.blocks[i] = Block(dw, dw_bn, pw, pw_bn)

    def _to_variables(self):
        # Weights as variables keep the traced graph small: a SavedModel of it saves
        # and converts in seconds instead of serialising every weight into the GraphDef.
        import tensorflow as tf

        self.tf_variables = []

        def wrap(value):
            if isinstance(value, np.ndarray):
                self.tf_variables.append(tf.Variable(value, trainable=False))
                return self.tf_variables[-1]
            if isinstance(value, list):
                return [wrap(v) for v in value]
            if isinstance(value, tuple):  # a Conv, an Affine, a Block
                return type(value)(*(wrap(v) for v in value))
            return value

        self.stem = wrap(self.stem)
        self.stem_bn = wrap(self.stem_bn)
        self.blocks = wrap(self.blocks)
        self.head = wrap(self.head)
        self.pre = wrap(self.pre)

    def __call__(self, x):
        import tensorflow as tf

        if self.pre is not None:
            x = x * self.pre.scale + self.pre.shift
        p = self.config.patch_size
        # bias_add right after a conv, then the activation: the converter fuses both into it.
        x = self._affine(
            self._act(
                tf.nn.bias_add(tf.nn.conv2d(x, self.stem.kernel, p, "VALID"), self.stem.bias)
            ),
            self.stem_bn,
        )
        for block in self.blocks:
            x = x + self._depthwise_branch(x, block)
            pw = tf.nn.bias_add(tf.nn.conv2d(x, block.pw.kernel, 1, "VALID"), block.pw.bias)
            x = self._affine(self._act(pw), block.pw_bn)
        if self.pooling == "avg":
            x = tf.reduce_mean(x, axis=[1, 2])
        elif self.pooling == "max":
            x = tf.reduce_max(x, axis=[1, 2])
        if self.head is not None:
            x = tf.matmul(x, self.head.kernel) + self.head.bias
            if self.softmax:
                x = tf.nn.softmax(x)
        return x

    def _depthwise_branch(self, x, block: Block):
        import tensorflow as tf

        if self.plan is None:
            return self._affine(self._act(self._spatial(x, block.dw)), block.dw_bn)
        # block.dw_bn.shift is None here: _fold_batchnorm moved it into the 1x1 conv's bias.
        xp, width = _pad_same(x, self.config.kernel_size), self.config.dim // len(block.dw.kernel)
        scales = block.dw_bn.scale
        parts = [
            self._affine(
                self._act(_tiled_depthwise(xp, tiles, self.plan, g * width, block.dw.bias[g])),
                Affine(None if scales is None else scales[g], None),
            )
            for g, tiles in enumerate(block.dw.kernel)
        ]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)

    def _affine(self, x, bn: Affine):
        import tensorflow as tf

        if bn.scale is None and bn.shift is None:
            return x
        if self.affine == "conv":
            channels = int(x.shape[-1])
            kernel = (
                tf.ones([1, 1, channels, 1])
                if bn.scale is None
                else tf.reshape(bn.scale, [1, 1, -1, 1])
            )
            x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")
            return x if bn.shift is None else tf.nn.bias_add(x, bn.shift)
        x = x if bn.scale is None else x * bn.scale
        return x if bn.shift is None else x + bn.shift

    def _act(self, x):
        import tensorflow as tf

        if self.config.activation == "relu":
            return tf.nn.relu(x)
        if self.gelu == "erf":
            # x / sqrt(2) as a Div: the pattern onnxruntime fuses into one Gelu kernel (a
            # multiplication by 1 / sqrt 2 is not matched, and each of the five unfused
            # elementwise ops leaves its blocked NCHWc layout).
            return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
        return tf.nn.gelu(x, approximate=False)

    def _spatial(self, x, conv: Conv):
        import tensorflow as tf

        if not self.config.depthwise:
            return tf.nn.bias_add(tf.nn.conv2d(x, conv.kernel, 1, "SAME"), conv.bias)
        return tf.nn.bias_add(
            tf.nn.depthwise_conv2d(x, conv.kernel, [1, 1, 1, 1], "SAME"), conv.bias
        )


def _check_forms(**given) -> None:
    wrong = [
        f"{key} must be one of {FORMS[key]}, got {value!r}"
        for key, value in given.items()
        if value not in FORMS[key]
    ]
    if wrong:
        raise ValueError("; ".join(wrong))


def _tiled(block: Block, plan, groups: int) -> Block:
    """The block with its depthwise kernel cut into the tiles of `plan`, per channel group."""

    def split(a):
        return None if a is None else np.split(a, groups, axis=-1)

    kernels = [_kernel_tiles(part, plan) for part in np.split(block.dw.kernel, groups, axis=2)]
    return Block(
        Conv(kernels, split(block.dw.bias)),
        Affine(split(block.dw_bn.scale), None),
        block.pw,
        block.pw_bn,
    )


def tile_plan(k: int, max_taps: int = MAX_TILE_TAPS) -> list:
    """Rectangles (row, col, height, width) that cover a k x k kernel exactly, each of at
    most `max_taps` taps: squares as large as that allows, then strips for the last rows
    and columns.

    max_taps 9: 7 -> four 3x3, a 1x7 row and a 6x1 column (six convolutions, 49 taps),
    9 -> nine 3x3. max_taps 25: 7 -> 5x5, 2x7, 5x2; 9 -> 5x5, 4x6, 4x3, 5x4.
    """
    tile = math.isqrt(max_taps)
    body = (k // tile) * tile
    plan = [(r, c, tile, tile) for r in range(0, body, tile) for c in range(0, body, tile)]
    rest = k - body
    if rest:
        step = max(1, max_taps // rest)
        # bottom rows, full width
        plan += [(body, c, rest, min(step, k - c)) for c in range(0, k, step)]
        # right columns
        plan += [(r, body, min(step, body - r), rest) for r in range(0, body, step)]
    return plan


def _kernel_tiles(kernel, plan) -> List[np.ndarray]:
    """The sub-kernels of a (k, k, C, 1) depthwise kernel for the rectangles of `plan`."""
    return [np.ascontiguousarray(kernel[r : r + h, c : c + w]) for r, c, h, w in plan]


def _pad_same(x, k):
    """Zero padding for a 'SAME' k x k convolution (TF and PyTorch: an even kernel's extra pixel goes right/bottom)."""
    import tensorflow as tf

    lo = (k - 1) // 2
    return tf.pad(x, [[0, 0], [lo, k - 1 - lo], [lo, k - 1 - lo], [0, 0]])


def _tiled_depthwise(xp, tiles, plan, channel_start=0, bias=None):
    """'SAME' depthwise convolution of the input that `_pad_same` padded into `xp`, as the sum
    of VALID convolutions of the `tiles` of `plan`, on channels channel_start.. of xp (+ bias)."""
    import tensorflow as tf

    k = max(r + h for r, _, h, _ in plan)
    height, width = tf.shape(xp)[1] - k + 1, tf.shape(xp)[2] - k + 1
    channels = int(tiles[0].shape[2])
    out = None
    for (r, c, h, w), kernel in zip(plan, tiles):
        window = xp[
            :,
            r : r + height + h - 1,
            c : c + width + w - 1,
            channel_start : channel_start + channels,
        ]
        part = tf.nn.depthwise_conv2d(window, kernel, [1, 1, 1, 1], "VALID")
        if out is None and bias is not None:
            part = tf.nn.bias_add(part, bias)  # fused into the first tile's conv
        out = part if out is None else out + part
    return out
