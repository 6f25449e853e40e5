"""Pretrained weights as a Keras model: converted once, with parity against the PyTorch
network, and kept in Keras' cache folder under the content hash of the weights (and the
repo's config.json). The cache is ours: an entry that is not what its name promises (another
model, a truncated file) is converted again and replaced."""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional

from convmixer_tf import outputs, saving, temporaries
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import attach, facts_of
from weights_converter import hub
from weights_converter.convert import convert_file
from weights_converter.parity import ParityError, prove


def cache_folder() -> str:
    """Where converted pretrained models are kept: Keras' cache folder (KERAS_HOME, or ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", "convmixer_tf")


def pretrained(
    checkpoint, variant: Optional[str] = None, log: Callable[[str], None] = lambda message: None
):
    """The Keras model of a checkpoint (`hf-hub:OWNER/NAME[@REV]` or a file): converted here
    with parity against the PyTorch network and cached, or the cached one, converting nothing.

    Example:
        >>> model = pretrained("hf-hub:timm/convmixer_768_32.in1k")  # doctest: +SKIP
    """
    source = hub.resolve(checkpoint)
    with open(source.path, "rb") as f:
        weights = outputs.sha256(f).hexdigest()
    key = hashlib.sha256(f"{weights}{(source.config, variant)!r}".encode()).hexdigest()
    cached = os.path.join(cache_folder(), f"{key}.keras")
    model = _from_cache(cached, variant, weights, log)
    if model is not None:
        return model
    log(f"converting {checkpoint} (once: the result is kept in {cached}) ...")
    conversion = convert_file(source, variant)
    parity = prove(conversion)
    if not parity.passed:
        raise ParityError(parity.describe())
    facts = facts_of(conversion.model)
    model = attach(conversion.model, facts.replace(source=dict(facts.source or {}, sha256=weights)))
    os.makedirs(cache_folder(), exist_ok=True)
    temporaries.remove_stale_temporaries(cache_folder())  # of conversions that were killed
    saving.save_model(model, cached)
    return model


def _from_cache(path, variant, weights, log):
    """The model cached at `path` when it is `variant`'s conversion of the weights with
    hash `weights`; None (convert again) when it is absent or anything else."""
    if not os.path.isfile(path):
        return None
    try:
        model = saving.load_model(path)
    except BadInput as err:
        log(f"the cached {path} cannot be read ({err}); converting again")
        return None
    facts = facts_of(model)
    if (facts.source or {}).get("sha256") != weights or (
        variant is not None and facts.variant != variant
    ):
        log(f"the cached {path} is not the conversion of these weights; converting again")
        return None
    return model
