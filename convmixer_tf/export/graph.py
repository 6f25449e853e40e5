"""The inference graph that exporters emit, written with plain TensorFlow ops.

Exporting the Keras model as it is gives correct files that are slow or broken on
some runtimes (see the notes at each choice below), so TFLite and ONNX files are
made from this graph instead. It takes its weights from a Keras ConvMixer, and every
file made from it is run in its own runtime and compared with the Keras model.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from convmixer_tf.model import BN_EPSILON, config_from_model

# LiteRT's XNNPACK runs a depthwise kernel of up to 9 taps in one pass at memory
# speed; 10-25 taps take a slower kernel, and more than 25 a multi-pass one that is
# slower still (one 7x7 on 1x32x32x768, 2 threads: 7.6 ms, where the six tiles of
# `tile_plan(7)` summed take 1.3 ms). Kernels larger than 5x5 are emitted as tiles.
FAST_DEPTHWISE_MAX = 5
MAX_TILE_TAPS = 9


def _bn_affine(layer):
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in layer.get_weights())
    scale = gamma / np.sqrt(var + layer.epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


class InferenceGraph:
    """A ConvMixer forward pass as a tf.function over constants.

    Args:
        model: a Keras ConvMixer built by convmixer_tf.
        preprocessing: (mean, std) to put raw 0-255 RGB -> normalised input in the graph
            (ignored when the model has its own preprocessing layer).
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
    """

    def __init__(self, model, preprocessing: Optional[Sequence[Sequence[float]]] = None,
                 depthwise: str = "native", gelu: str = "builtin", variables: bool = False,
                 affine: str = "ops", channel_groups: int = 1, tile_taps: int = MAX_TILE_TAPS):
        if depthwise not in ("native", "tiled") or gelu not in ("builtin", "erf") or affine not in ("ops", "conv"):
            raise ValueError(f"depthwise must be native|tiled, gelu builtin|erf, affine ops|conv; "
                             f"got {depthwise!r}, {gelu!r}, {affine!r}")
        self.affine = affine
        self.config = config_from_model(model)
        self.depthwise, self.gelu = depthwise, gelu
        if channel_groups < 1 or self.config.dim % channel_groups:
            raise ValueError(f"channel_groups must divide the width {self.config.dim}, got {channel_groups}")
        self.input_shape = tuple(model.input_shape[1:])
        layer = {l.name: l for l in model.layers}
        self.pre = None
        if "preprocessing" in layer:
            pre = layer["preprocessing"]
            self.pre = (np.asarray(pre.scale, np.float32).reshape(-1), np.asarray(pre.offset, np.float32).reshape(-1))
        elif preprocessing is not None:
            mean, std = (np.asarray(v, np.float64) for v in preprocessing)
            self.pre = ((1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32))
        self.raw_rgb = self.pre is not None
        w = lambda name: [np.asarray(v, np.float32) for v in layer[name].get_weights()]
        self.stem = w("stem_conv") + list(_bn_affine(layer["stem_bn"]))  # kernel, bias, bn scale, bn shift
        self.blocks = []
        for i in range(self.config.depth):
            self.blocks.append(w(f"block{i}_dw_conv") + list(_bn_affine(layer[f"block{i}_dw_bn"]))
                               + w(f"block{i}_pw_conv") + list(_bn_affine(layer[f"block{i}_pw_bn"])))
        self.pooling = "max" if "max_pool" in layer else ("avg" if "avg_pool" in layer else None)
        self.head = w("head") if "head" in layer else None
        self.head_activation = layer["head"].get_config()["activation"] if self.head else "linear"
        self._fold_batchnorm()
        self.plan = None
        if self.depthwise == "tiled" and self.config.depthwise and self.config.kernel_size > FAST_DEPTHWISE_MAX:
            self.plan = tile_plan(self.config.kernel_size, tile_taps)
            split = lambda a: None if a is None else np.split(a, channel_groups, axis=-1)
            for block in self.blocks:  # kernel, bias, scale: per channel group, the kernel per tile
                block[0] = [_kernel_tiles(part, self.plan) for part in np.split(block[0], channel_groups, axis=2)]
                block[1], block[2] = split(block[1]), split(block[2])
        if variables:
            # Weights as variables keep the traced graph small: a SavedModel of it saves
            # and converts in seconds instead of serialising every weight into the GraphDef.
            import tensorflow as tf

            def wrap(a):
                if isinstance(a, (list, tuple)):
                    return type(a)(wrap(t) for t in a)
                return None if a is None else tf.Variable(a, trainable=False)

            self.stem, self.blocks, self.head, self.pre = wrap(self.stem), wrap(self.blocks), wrap(self.head), wrap(self.pre)

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

        def scale_into(kernel, bias, scale, channel_axis):
            if not relu or scale is None or not np.all(scale > 0):
                return kernel, bias, scale
            shape = [1] * kernel.ndim
            shape[channel_axis] = -1
            return (kernel.astype(np.float64) * scale.reshape(shape)).astype(np.float32), \
                (bias.astype(np.float64) * scale).astype(np.float32), None

        k, b, s, t = self.stem
        self.stem = [*scale_into(k, b, s, 3), t]
        depthwise_axis = 2 if self.config.depthwise else 3
        for block in self.blocks:
            dk, db, ds, dt, pk, pb, ps, pt = block
            pb = (pb.astype(np.float64) + dt.astype(np.float64) @ pk[0, 0].astype(np.float64)).astype(np.float32)
            dk, db, ds = scale_into(dk, db, ds, depthwise_axis)
            pk, pb, ps = scale_into(pk, pb, ps, 3)
            block[:] = [dk, db, ds, None, pk, pb, ps, pt]

    @property
    def tf_variables(self) -> list:
        import tensorflow as tf

        def flat(a):
            return [v for t in a for v in flat(t)] if isinstance(a, (list, tuple)) else [a]

        return [v for v in flat([self.stem, self.blocks, self.head or [], self.pre or []]) if isinstance(v, tf.Variable)]

    def __call__(self, x):
        import tensorflow as tf

        c = lambda a: tf.constant(a) if isinstance(a, np.ndarray) else a
        if self.pre is not None:
            x = x * c(self.pre[0]) + c(self.pre[1])

        def affine(x, scale, shift):  # what is left of a BatchNorm after _fold_batchnorm
            if self.affine == "conv" and (scale is not None or shift is not None):
                kernel = tf.ones([1, 1, self.config.dim, 1]) if scale is None else tf.reshape(c(scale), [1, 1, -1, 1])
                x = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")
                return x if shift is None else tf.nn.bias_add(x, c(shift))
            x = x if scale is None else x * c(scale)
            return x if shift is None else x + c(shift)

        k, b, s, t = self.stem
        p = self.config.patch_size
        # bias_add right after a conv, then the activation: the converter fuses both into it.
        x = affine(self._act(tf.nn.bias_add(tf.nn.conv2d(x, c(k), p, "VALID"), c(b))), s, t)
        for dk, db, ds, dt, pk, pb, ps, pt in self.blocks:
            if self.plan is None:
                x = x + affine(self._act(self._spatial(x, dk, db, c)), ds, dt)
            else:  # dt is None here: _fold_batchnorm moved it into the 1x1 conv's bias
                xp, width = _pad_same(x, self.config.kernel_size), self.config.dim // len(dk)
                parts = [affine(self._act(_tiled_depthwise(xp, [c(t) for t in tiles], self.plan, g * width, c(db[g]))),
                                None if ds is None else ds[g], None) for g, tiles in enumerate(dk)]
                x = x + (parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1))
            x = affine(self._act(tf.nn.bias_add(tf.nn.conv2d(x, c(pk), 1, "VALID"), c(pb))), ps, pt)
        if self.pooling == "avg":
            x = tf.reduce_mean(x, axis=[1, 2])
        elif self.pooling == "max":
            x = tf.reduce_max(x, axis=[1, 2])
        if self.head is not None:
            x = tf.matmul(x, c(self.head[0])) + c(self.head[1])
            if self.head_activation == "softmax":
                x = tf.nn.softmax(x)
            elif self.head_activation not in (None, "linear"):
                raise ValueError(f"classifier activation {self.head_activation!r} is not exportable")
        return x

    def _act(self, x):
        import tensorflow as tf

        if self.config.activation == "relu":
            return tf.nn.relu(x)
        if self.gelu == "erf":
            # x / sqrt(2) as a Div: the pattern onnxruntime fuses into one Gelu kernel (with
            # x * (1 / sqrt 2) it ran five elementwise ops, each leaving its NCHWc layout).
            return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))
        return tf.nn.gelu(x, approximate=False)

    def _spatial(self, x, kernel, bias, c):
        import tensorflow as tf

        if not self.config.depthwise:
            return tf.nn.bias_add(tf.nn.conv2d(x, c(kernel), 1, "SAME"), c(bias))
        return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, c(kernel), [1, 1, 1, 1], "SAME"), c(bias))


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
        plan += [(body, c, rest, min(step, k - c)) for c in range(0, k, step)]  # bottom rows, full width
        plan += [(r, body, min(step, body - r), rest) for r in range(0, body, step)]  # right columns
    return plan


def _kernel_tiles(kernel, plan):
    """The sub-kernels of a (k, k, C, 1) depthwise kernel for the rectangles of `plan`."""
    return [np.ascontiguousarray(kernel[r:r + h, c:c + w]) for r, c, h, w in plan]


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
        window = xp[:, r: r + height + h - 1, c: c + width + w - 1, channel_start: channel_start + channels]
        part = tf.nn.depthwise_conv2d(window, kernel, [1, 1, 1, 1], "VALID")
        if out is None and bias is not None:
            part = tf.nn.bias_add(part, bias)  # fused into the first tile's conv
        out = part if out is None else out + part
    return out
