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

# LiteRT's XNNPACK depthwise kernels are fast up to 5x5 and slow beyond: on a
# 1x32x32x768 input a 7x7 ran ~13 ms and a 9x9 ~27 ms where nine 3x3 convolutions
# summed ran ~5 ms (benchmarks/bench_export.py). Larger kernels are emitted as tiles.
FAST_DEPTHWISE_MAX = 5


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
        depthwise: "native" (one DEPTHWISE_CONV_2D) or "tiled" (k x k as a sum of
            `tile` x `tile` tiles, for LiteRT/XNNPACK when k > 5).
        gelu: "builtin" (tf.nn.gelu exact, which TFLite maps to its GELU op) or "erf"
            (0.5 x (1 + erf(x / sqrt 2)); TF's exact gelu lowers to Erfc, which
            tf2onnx cannot convert).
        affine: how the per-channel scale/shift left of a BatchNorm is written: "ops"
            (Mul / Add) or "conv" (a 1x1 depthwise conv with bias). onnxruntime keeps
            a 1x1 grouped Conv in its blocked NCHWc layout and fuses the residual Add into
            it, while a broadcast Add sends every block back to NCHW and out again.
    """

    def __init__(self, model, preprocessing: Optional[Sequence[Sequence[float]]] = None,
                 depthwise: str = "native", gelu: str = "builtin", variables: bool = False, tile: int = 3,
                 affine: str = "ops"):
        if depthwise not in ("native", "tiled") or gelu not in ("builtin", "erf") or affine not in ("ops", "conv"):
            raise ValueError(f"depthwise must be native|tiled, gelu builtin|erf, affine ops|conv; "
                             f"got {depthwise!r}, {gelu!r}, {affine!r}")
        self.affine = affine
        self.config = config_from_model(model)
        self.depthwise, self.gelu, self.tile = depthwise, gelu, tile
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
        if self.depthwise == "tiled" and self.config.depthwise and self.config.kernel_size > FAST_DEPTHWISE_MAX:
            for block in self.blocks:
                block[0] = _kernel_tiles(block[0], tile)
        if variables:
            # Weights as variables keep the traced graph small: a SavedModel of it saves
            # and converts in seconds instead of serialising every weight into the GraphDef.
            import tensorflow as tf

            wrap = lambda a: None if a is None else tf.Variable(a, trainable=False)
            self.stem = [wrap(a) for a in self.stem]
            self.blocks = [[[wrap(t) for t in a] if isinstance(a, list) else wrap(a) for a in b] for b in self.blocks]
            self.head = [wrap(a) for a in self.head] if self.head else None
            if self.pre is not None:
                self.pre = tuple(wrap(a) for a in self.pre)

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

        found = list(self.stem) + [a for b in self.blocks for x in b for a in (x if isinstance(x, list) else [x])]
        found += list(self.head or []) + list(self.pre or [])
        return [v for v in found if isinstance(v, tf.Variable)]

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
            x = x + affine(self._act(self._spatial(x, dk, db, c)), ds, dt)
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
            return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))
        return tf.nn.gelu(x, approximate=False)

    def _spatial(self, x, kernel, bias, c):
        import tensorflow as tf

        if isinstance(kernel, list):
            return _tiled_depthwise(x, [c(t) for t in kernel], self.config.kernel_size, self.tile, c(bias))
        if not self.config.depthwise:
            return tf.nn.bias_add(tf.nn.conv2d(x, c(kernel), 1, "SAME"), c(bias))
        return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, c(kernel), [1, 1, 1, 1], "SAME"), c(bias))


def _kernel_tiles(kernel, tile):
    """Splits a (k, k, C, 1) kernel, zero-padded to a multiple of `tile`, into tiles, row-major."""
    k = kernel.shape[0]
    n = -(-k // tile)
    padded = np.zeros((n * tile, n * tile) + kernel.shape[2:], np.float32)
    padded[:k, :k] = kernel
    return [padded[a * tile:(a + 1) * tile, b * tile:(b + 1) * tile].copy() for a in range(n) for b in range(n)]


def _tiled_depthwise(x, tiles, k, tile, bias=None):
    """'SAME' depthwise k x k as the sum of VALID tile x tile convolutions of `tiles` (+ bias)."""
    import tensorflow as tf

    n = -(-k // tile)
    lo = (k - 1) // 2  # TF and PyTorch 'same': the extra pixel of an even kernel goes right/bottom
    hi = k - 1 - lo + (n * tile - k)
    xp = tf.pad(x, [[0, 0], [lo, hi], [lo, hi], [0, 0]])
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    out = None
    for index, kernel in enumerate(tiles):
        a, b = divmod(index, n)
        window = xp[:, a * tile: a * tile + h + tile - 1, b * tile: b * tile + w + tile - 1, :]
        part = tf.nn.depthwise_conv2d(window, kernel, [1, 1, 1, 1], "VALID")
        if out is None and bias is not None:
            part = tf.nn.bias_add(part, bias)  # fused into the first tile's conv
        out = part if out is None else out + part
    return out
