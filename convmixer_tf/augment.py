"""Training augmentation: the paper's recipe, with Keras 3's own layers where they exist.

Images stay raw float32 pixels throughout (the model normalises inside its graph).
Keras has no RandomResizedCrop, so that one is written here with TensorFlow ops,
following torchvision's sampling (ten tries at a random area and log-uniform aspect
ratio, then a centre crop).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

from convmixer_tf.config import PIXEL_MAX
from convmixer_tf.errors import BadInput

# torchvision's RandAugment spreads magnitudes over 31 bins (0..30); Keras' factor is
# the fraction of the strongest setting.
RANDAUGMENT_BINS = 30


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; the defaults are the paper's CIFAR-10 run (92.6% in 25 epochs).

    Args:
        scale: RandomResizedCrop area range, as a fraction of the image.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: random horizontal flips.
        randaugment_n, randaugment_m: RandAugment ops per image and magnitude (0-30);
            n=0 turns it off.
        jitter: colour jitter strength (brightness, contrast, saturation); 0 is off.
        erasing: probability of random erasing per image.
        mixup, cutmix: alpha of mixup and of cutmix; when both are on, each batch uses
            one of them with equal probability (timm's switch_prob 0.5).
    """

    scale: Tuple[float, float] = (1.0, 1.0)
    ratio: Tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    randaugment_n: int = 2
    randaugment_m: int = 12
    jitter: float = 0.0
    erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise BadInput(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise BadInput(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.randaugment_m <= RANDAUGMENT_BINS or self.randaugment_n < 0:
            raise BadInput(
                f"randaugment needs n >= 0 and 0 <= m <= {RANDAUGMENT_BINS}, "
                f"got n={self.randaugment_n}, m={self.randaugment_m}"
            )
        for field in ("jitter", "erasing", "mixup", "cutmix"):
            if getattr(self, field) < 0:
                raise BadInput(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.erasing > 1:
            raise BadInput(f"erasing is a probability, got {self.erasing}")


def random_resized_crop(image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10):
    """torchvision's RandomResizedCrop of one (H, W, 3) image to (size, size, 3), bilinear."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = h * w
    target = area * tf.random.uniform([tries], scale[0], scale[1])
    log_ratio = tf.random.uniform([tries], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    # Fallback (no try fits): the largest centre crop with the ratio clamped to range.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    first = tf.argmax(tf.cast(ok, tf.int32))
    found = tf.reduce_any(ok)
    crop_w = tf.where(found, tf.gather(cw, first), fb_w)
    crop_h = tf.where(found, tf.gather(ch, first), fb_h)
    top = tf.where(
        found, tf.floor(tf.random.uniform([], 0, 1) * (h - crop_h + 1)), tf.floor((h - crop_h) / 2)
    )
    left = tf.where(
        found, tf.floor(tf.random.uniform([], 0, 1) * (w - crop_w + 1)), tf.floor((w - crop_w) / 2)
    )
    box = [tf.cast(value, tf.int32) for value in (top, left, crop_h, crop_w)]
    crop = tf.image.crop_to_bounding_box(image, *box)
    return tf.image.resize(
        tf.cast(crop, tf.float32), (size, size), method="bilinear", antialias=True
    )


class Augmenter:
    """Per-image augmentation (crop, flip, RandAugment, jitter, erasing) and per-batch
    mixing (mixup / cutmix), as tf.data map functions.

    Each image gets its own RandAugment ops: the Keras layer picks one set of ops per
    call, so it is called on single images (the map runs them in parallel).
    """

    def __init__(self, config: AugmentConfig, size: int, num_classes: int, *, seed: int = 0):
        import keras

        self.config = config
        self.size = size
        self.num_classes = num_classes
        self.image_layers = _image_layers(config, seed)
        self.mixers = []  # none: batches are not mixed
        if config.mixup > 0:
            self.mixers.append(keras.layers.MixUp(alpha=config.mixup, seed=seed + 4))
        if config.cutmix > 0:
            self.mixers.append(keras.layers.CutMix(factor=config.cutmix, seed=seed + 5))

    def image(self, image, label):
        """One (H, W, 3) uint8 image -> (size, size, 3) float32 raw pixels, one-hot label."""
        import tensorflow as tf

        x = random_resized_crop(image, self.size, self.config.scale, self.config.ratio)
        for layer in self.image_layers:
            x = layer(x, training=True)
        x = tf.clip_by_value(tf.cast(x, tf.float32), 0.0, PIXEL_MAX)
        x.set_shape([self.size, self.size, 3])
        return x, tf.one_hot(label, self.num_classes)

    def batch(self, images, labels):
        """Mixup or cutmix of one batch (labels one-hot, mixed the same way)."""
        import tensorflow as tf

        def apply(layer):
            out = layer({"images": images, "labels": labels}, training=True)
            return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

        if len(self.mixers) == 1:
            return apply(self.mixers[0])
        return tf.cond(
            tf.random.uniform([]) < 0.5,
            lambda: apply(self.mixers[0]),
            lambda: apply(self.mixers[1]),
        )


def _image_layers(config: AugmentConfig, seed: int) -> list:
    """The per-image random layers of `config`, in the order they apply: flip, RandAugment,
    colour jitter, random erasing."""
    import keras

    layers = []
    if config.hflip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.randaugment_n > 0 and config.randaugment_m > 0:
        factor = config.randaugment_m / RANDAUGMENT_BINS
        layers.append(
            keras.layers.RandAugment(
                value_range=(0, PIXEL_MAX),
                num_ops=config.randaugment_n,
                factor=factor,
                seed=seed + 1,
            )
        )
    if config.jitter > 0:
        j = config.jitter
        layers.append(
            keras.layers.RandomColorJitter(
                value_range=(0, PIXEL_MAX),
                brightness_factor=j,
                contrast_factor=j,
                saturation_factor=j,
                seed=seed + 2,
            )
        )
    if config.erasing > 0:
        # (p, p): erase with probability exactly p; grey is about the ImageNet mean.
        erasing = (config.erasing, config.erasing)
        layers.append(
            keras.layers.RandomErasing(
                factor=erasing, fill_value=PIXEL_MAX / 2, value_range=(0, PIXEL_MAX), seed=seed + 3
            )
        )
    return layers
