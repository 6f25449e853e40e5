"""Training and fine-tuning: the paper's recipe on tfds sets or image folders, on one
device, several, or several processes.

`train(TrainConfig(...))` is the whole job (`convmixer_tf.train.run`);
`python -m convmixer_tf.train` only parses arguments into a TrainConfig. Importing this
package loads no Keras.
"""

from __future__ import annotations

from typing import Callable

from convmixer_tf.augment import AugmentConfig
from convmixer_tf.train.recipe import DISTRIBUTIONS, PRECISIONS, SCHEDULES, TrainConfig

__all__ = ["DISTRIBUTIONS", "PRECISIONS", "SCHEDULES", "AugmentConfig", "TrainConfig", "train"]


def train(config: TrainConfig, log: Callable[[str], None] = print, source=None) -> dict:
    """Runs (or resumes) one training run; returns the final metrics (see `run.train`).

    Example:
        >>> metrics = train(TrainConfig(dataset="cifar10", epochs=25, output="runs/c10"))  # doctest: +SKIP
    """
    from convmixer_tf.train.run import train as run

    return run(config, log, source)
