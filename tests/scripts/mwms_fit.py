"""One worker of a two-worker tf.distribute.MultiWorkerMirroredStrategy run of Keras 3's
fit (TF_CONFIG on localhost). Prints "FIT OK" or "FIT FAILED" and the error: the test that
runs it records whether this stack supports the strategy.

    python mwms_fit.py INDEX PORT0 PORT1
"""

import json
import os
import sys

index = int(sys.argv[1])
port0, port1 = sys.argv[2:4]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{port0}", f"localhost:{port1}"]},
        "task": {"type": "worker", "index": index},
    }
)
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
data = tf.data.Dataset.from_tensor_slices(
    (np.ones((64, 4), "float32"), np.zeros((64, 3), "float32"))
).batch(8)
try:
    model.fit(data.repeat(), epochs=2, steps_per_epoch=4, verbose=0)
    print(index, "FIT OK")
except Exception as err:  # noqa: BLE001 - what fails is the finding
    print(index, "FIT FAILED", type(err).__name__, " ".join(str(err).split())[:400])
