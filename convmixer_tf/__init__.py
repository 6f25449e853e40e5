"""ConvMixer ("Patches Are All You Need?") in Keras 3, built from stock layers.

The builder is imported lazily, so reading the variant table (command-line help,
argument checks) does not load Keras and its backend.
"""

from convmixer_tf.config import (
    VARIANTS,
    ConvMixerConfig,
    Preprocessing,
    Variant,
    get_variant,
    list_variants,
)
from convmixer_tf.contract import ModelInfo, info_of, load_model, save_model

__version__ = "0.1.0"

_MODEL_API = ("ConvMixer", "build_features", "config_from_model", "create_model", "rebuild", "with_preprocessing")

__all__ = ["VARIANTS", "ConvMixerConfig", "ModelInfo", "Preprocessing", "Variant", "get_variant", "info_of",
           "list_variants", "load_model", "save_model", *_MODEL_API]


def __getattr__(name):
    if name in _MODEL_API:
        from convmixer_tf import model

        return getattr(model, name)
    raise AttributeError(f"module 'convmixer_tf' has no attribute {name!r}")
