"""`create_model`: a named variant, fresh or with pretrained weights. It sits above both
packages, as timm's factory sits above its builders: the model builder never imports the
converter, and the converter (which needs torch for its proof of parity) is imported here
only when weights are asked for."""

from __future__ import annotations

from convmixer_tf.config import get_variant
from convmixer_tf.errors import BadInput
from convmixer_tf.model import build_variant, rebuild

PRETRAINED_OVERRIDES = ("input_shape", "num_classes", "include_preprocessing")


def create_model(name: str, *, pretrained=False, **overrides):
    """Builds a named variant (see `list_variants()`), with any builder argument overridden.

    The input size defaults to the variant's training resolution (224 for ImageNet,
    32 for CIFAR-10) and the normalisation (with include_preprocessing) is the variant's.

    Args:
        pretrained: True for the variant's released weights (timm's Hub repo), or an
            `hf-hub:OWNER/NAME[@REVISION]` id, or a checkpoint file. The first call
            converts them with the converter (`weights_converter`, which needs torch for
            its proof of parity) and caches the result in Keras' cache folder, keyed by
            the weights' content; later calls load that. Then only input_shape,
            num_classes (a new head) and include_preprocessing may be overridden.

    Example:
        >>> model = create_model("convmixer_768_32", num_classes=10)
        >>> model.get_layer("stem_act").get_config()["activation"]
        'relu'
        >>> model = create_model("convmixer_768_32", pretrained=True)  # doctest: +SKIP
    """
    if not pretrained:
        return build_variant(name, **overrides)
    from weights_converter.pretrained import pretrained as converted

    variant = get_variant(name)
    if pretrained is True and not variant.hub_id:
        raise BadInput(
            f"{variant.config.describe()} has no released weights: pass pretrained=FILE or hf-hub:ID"
        )
    unknown = sorted(set(overrides) - set(PRETRAINED_OVERRIDES))
    if unknown:
        raise BadInput(f"a pretrained model takes {', '.join(PRETRAINED_OVERRIDES)}, not {unknown}")
    model = converted(f"hf-hub:{variant.hub_id}" if pretrained is True else pretrained, name)
    if not overrides:
        return model
    return rebuild(
        model,
        overrides.get("input_shape"),
        num_classes=overrides.get("num_classes"),
        raw_rgb=overrides.get("include_preprocessing"),
    )
