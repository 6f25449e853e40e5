"""Trains one tiny ConvMixer for a few steps on one device, then on two logical CPU
devices through convmixer_tf.train.distribute.distribution, and prints how far apart the two
runs end (JSON). Run in a subprocess: the device count is fixed before the backend starts.

    KERAS_BACKEND=tensorflow python distributed_step.py mirrored
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 python distributed_step.py data-parallel
"""

import json
import os
import sys

kind = sys.argv[1]
if os.environ.get("KERAS_BACKEND") == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from convmixer_tf import ConvMixer  # noqa: E402
from convmixer_tf.model import rebuild  # noqa: E402
from convmixer_tf.train.distribute import distribution  # noqa: E402

rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 4, 16), 4)
source = ConvMixer(
    dim=16,
    depth=2,
    kernel_size=5,
    patch_size=4,
    num_classes=4,
    input_shape=(32, 32, 3),
    include_preprocessing=True,
)


def run(scope, sync):
    with scope:
        model = rebuild(source, synchronized_bn=sync)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"], [np.asarray(w) for w in model.get_weights()]


single_loss, single = run(distribution("none")[0], False)
scope, replicas, chosen = distribution(kind)
multi_loss, multi = run(scope, chosen == "mirrored" and "--no-sync-bn" not in sys.argv)
print(
    json.dumps(
        {
            "replicas": replicas,
            "kind": chosen,
            "loss_single": single_loss,
            "loss_multi": multi_loss,
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(single, multi)),
            "max_weight_change": max(
                float(np.max(np.abs(a - np.asarray(w))))
                for a, w in zip(single, rebuild(source).get_weights())
            ),
        }
    )
)
