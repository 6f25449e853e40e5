"""Applies the mapping table: PyTorch tensors -> Keras model, and Keras -> state dict."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

from convmixer_tf import labels
from convmixer_tf.config import Preprocessing, get_variant
from convmixer_tf.errors import BadInput
from convmixer_tf.facts import Facts, facts_of
from convmixer_tf.model import build
from weights_converter import hub, layouts, mapping
from weights_converter.checkpoint import read_checkpoint


@dataclasses.dataclass
class Conversion:
    """A converted Keras model and the account of how it was made. Its config and the released
    variant it matches are the model's facts (`facts_of(model)`); `canonical` holds the
    tensors under timm's names, for the PyTorch reference to load under its own."""

    model: object  # keras.Model
    layout: str
    activation_source: str  # "flag", "variant", "variant name" or "default"
    canonical: Dict[str, np.ndarray]
    checkpoint: Optional[dict] = None  # the file's `Checkpoint.summary`
    # "labels file", "ImageNet-1k (timm)", "the hub's config.json" or "none"
    class_names_source: str = "none"

    def summary(self) -> dict:
        facts = facts_of(self.model)
        return {
            "class_names": self.class_names_source,
            "checkpoint": self.checkpoint,
            "layout": self.layout,
            "config": facts.config.to_dict(),
            "include_top": facts.config.num_classes > 0,
            "matched_variant": facts.variant,
            "activation_source": self.activation_source,
            # every weight, each once (_fill)
            "weights_copied": len(self.model.weights),
            "unused_keys": [],
        }

    def release(self) -> None:
        """Drops the PyTorch tensors (the checkpoint's, under their canonical names): the Keras
        model holds its own copy of every weight."""
        self.canonical.clear()

    def describe(self) -> str:
        facts = facts_of(self.model)
        c = facts.config
        return (
            f"{c.describe()}, {c.activation} ({self.activation_source}), "
            f"{c.num_classes or 'no'} classes (names: {self.class_names_source}), "
            f"layout {self.layout}, matches {facts.variant or 'no released variant'}"
        )


def convert_state_dict(
    state_dict: Dict[str, np.ndarray],
    variant: Optional[str] = None,
    *,
    activation: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    pretrained_cfg: Optional[dict] = None,
) -> Conversion:
    """Builds the Keras ConvMixer that `state_dict` describes and fills every weight.

    Args:
        state_dict: tensors as numpy arrays, any supported layout.
        variant: a name from `convmixer_tf.list_variants()` that the checkpoint must
            match; it also decides the activation unless `activation` is given.
        activation: "gelu" or "relu"; weights cannot tell which one was trained.
        class_names: one name per class, stored with the model; default ImageNet-1k's for
            a 1000-class released variant (from timm, when it is installed).
        pretrained_cfg: what the weights' source says of them (`hub.Source.pretrained_cfg`):
            preprocessing, class names, where they came from.

    Every Keras weight is filled exactly once, every tensor is used or named, every
    shape is checked before anything is copied; an unexpected tensor is an error.
    """
    canonical, layout = layouts.to_canonical(state_dict)
    mapping.check_finite(state_dict)
    config, matched, activation_source = _architecture(state_dict, variant, activation, layout)
    include_top = mapping.has_head(canonical)
    rows = mapping.plan(canonical, config, include_top, layout=layout)
    cfg = dict(pretrained_cfg or {})
    names, names_source = _class_names(class_names, cfg, matched, config, include_top)
    # the transform: the source's, else the released variant's, else ImageNet's
    pre = cfg.get("preprocessing") or (get_variant(matched).preprocessing if matched else None)
    facts = Facts(config, pre or Preprocessing(), names, matched, source=cfg.get("source"))
    model = build(facts, name=matched or "convmixer")
    _fill(model, rows, canonical)
    return Conversion(model, layout, activation_source, canonical, class_names_source=names_source)


def _architecture(state_dict, variant, activation, layout):
    """(config, the released variant it is, where its activation came from) of a `layout`
    state dict: read from shapes, checked against `variant` when one is named."""
    config = mapping.infer_config(state_dict, activation, layout=layout)
    matched = mapping.match_variant(config)
    if activation:
        source = "flag"
    else:
        source = "variant" if matched else "default"
    if variant is None:
        return config, matched, source
    ref = get_variant(variant).config
    if mapping.architecture(ref) != mapping.architecture(config):
        raise mapping.MappingError(
            f"--variant {variant} is {ref.describe()}, but the checkpoint is {config.describe()}"
        )
    if activation is None:
        return config.replace(activation=ref.activation), variant, "variant name"
    return config, variant, source


def _class_names(given, cfg, matched, config, include_top):
    """(names, where they came from): given ones, else the source's (a hub config), else
    ImageNet-1k's for a released variant's 1000-class head."""
    if given is not None:
        names, source = tuple(given), "labels file"
        origin = source
    elif cfg.get("class_names") is not None:
        names, source = tuple(cfg["class_names"]), "the hub's config.json"
        origin = f"label_names of config.json of hf-hub:{cfg['source']['repo']}"
    else:
        released = matched is not None and get_variant(matched).timm_name is not None
        names = None
        if released and include_top and config.num_classes == 1000:
            names = labels.imagenet_class_names()
        return names, "ImageNet-1k (timm)" if names is not None else "none"
    if not include_top:
        raise mapping.MappingError(
            f"class names were given ({origin}), but the checkpoint has no classifier head"
        )
    try:
        labels.check_class_names(names, config.num_classes)
    except BadInput as err:
        raise BadInput(f"{origin}: {err}") from None
    return names, source


def convert_checkpoint(path, variant=None, *, activation=None, use_ema=False):
    """Reads a PyTorch ConvMixer checkpoint file (or `hf-hub:OWNER/NAME[@REV]`) and returns
    the Keras model, which takes any input size (`convmixer_tf.rebuild` fixes one).

    Example:
        >>> model = convert_checkpoint("convmixer_768_32.pth.tar")  # doctest: +SKIP
        >>> model.save("convmixer_768_32.keras")  # doctest: +SKIP
    """
    return convert_file(path, variant, activation=activation, use_ema=use_ema).model


def convert_file(
    path, variant=None, *, activation=None, use_ema=False, class_names=None
) -> Conversion:
    """Like `convert_checkpoint`, returning the full `Conversion` record (`path` may also be
    a `hub.Source` already resolved)."""
    source = path if isinstance(path, hub.Source) else hub.resolve(path)
    checkpoint = read_checkpoint(source.path, use_ema=use_ema)
    conversion = convert_state_dict(
        checkpoint.state_dict,
        variant,
        activation=activation,
        class_names=class_names,
        pretrained_cfg=source.pretrained_cfg,
    )
    conversion.checkpoint = checkpoint.summary
    return conversion


def _fill(model, rows, state_dict) -> None:
    """Copies each row's tensor into its Keras weight; `mapping.plan` has checked every
    shape (and Keras' assign refuses another, a bug of the table's)."""
    filled = set()
    for row in rows:
        variable = getattr(model.get_layer(row.layer), row.weight)
        value = mapping.TRANSFORMS[row.transform].to_keras(state_dict[row.key])
        variable.assign(np.ascontiguousarray(value, dtype=np.float32))
        filled.add(id(variable))
    missed = [w.path for w in model.weights if id(w) not in filled]  # would keep their random init
    if missed:
        raise AssertionError(f"weights not filled by the table: {missed}")


def keras_to_state_dict(model, layout: str = "timm", framework: str = "numpy") -> dict:
    """The reverse: a Keras ConvMixer's weights as a PyTorch state dict.

    Args:
        model: a ConvMixer built by convmixer_tf (e.g. fine-tuned, loaded from .keras).
        layout: "timm" (loads into timm's ConvMixer with strict=True), "sequential" (the
            paper's nn.Sequential), "one_liner" (its 280-character listing) or "labml".
        framework: "numpy" arrays or "torch" tensors.

    Example:
        >>> sd = keras_to_state_dict(model, framework="torch")  # doctest: +SKIP
        >>> timm.create_model("convmixer_768_32").load_state_dict(sd, strict=True)  # doctest: +SKIP
    """
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")
    config = facts_of(model).config
    out = {}
    for row in mapping.weight_table(config, config.num_classes > 0):
        value = np.asarray(
            getattr(model.get_layer(row.layer), row.weight).numpy(), dtype=np.float32
        )
        out[row.key] = np.ascontiguousarray(mapping.TRANSFORMS[row.transform].to_torch(value))
    # BatchNorm's counter: not a weight, but part of a strict PyTorch state dict.
    for key in [k for k in out if k.endswith(".running_var")]:
        out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    out = layouts.from_canonical(out, layout, config.depth)
    if framework == "torch":
        import torch

        return {k: torch.from_numpy(v) for k, v in out.items()}
    return out
