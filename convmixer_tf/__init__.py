"""ConvMixer ("Patches Are All You Need?") in Keras 3, built from stock layers."""

from convmixer_tf.config import (
    VARIANTS,
    ConvMixerConfig,
    Preprocessing,
    Variant,
    get_variant,
    list_variants,
)
from convmixer_tf.model import ConvMixer, build_features, config_from_model, create_model

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "ConvMixer",
    "ConvMixerConfig",
    "Preprocessing",
    "Variant",
    "build_features",
    "config_from_model",
    "create_model",
    "get_variant",
    "list_variants",
]
