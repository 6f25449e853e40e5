"""ConvMixer ("Patches Are All You Need?") in Keras 3, built from stock layers.

Importing the package loads no Keras: the builder imports it when called, so command
lines answer --help and check their arguments at once.
"""

# First: a command line stops on SIGINT and SIGTERM from here on (see `interrupts`).
from convmixer_tf import interrupts  # noqa: F401
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
from convmixer_tf.model import ConvMixer, build, rebuild
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
    "create_model",
    "get_variant",
    "facts_of",
    "list_variants",
    "load_model",
    "rebuild",
    "save_model",
]
