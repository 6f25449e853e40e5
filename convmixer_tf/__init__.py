"""ConvMixer ("Patches Are All You Need?") in Keras 3, built from stock layers.

Importing the package loads no Keras: the builder imports it when called, so command
lines answer --help and check their arguments at once.
"""

from convmixer_tf.config import (
    VARIANTS,
    ConvMixerConfig,
    Preprocessing,
    Variant,
    get_variant,
    list_variants,
)
from convmixer_tf.factory import create_model
from convmixer_tf.facts import Facts, facts_of
from convmixer_tf.model import ConvMixer, build, config_from_model, rebuild
from convmixer_tf.saving import load_model, save_model
from convmixer_tf.version import __version__

__all__ = [
    "VARIANTS",
    "ConvMixer",
    "ConvMixerConfig",
    "Facts",
    "Preprocessing",
    "Variant",
    "__version__",
    "build",
    "config_from_model",
    "create_model",
    "get_variant",
    "facts_of",
    "list_variants",
    "load_model",
    "rebuild",
    "save_model",
]
