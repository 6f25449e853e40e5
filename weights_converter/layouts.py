"""How checkpoints name ConvMixer's tensors: one renaming table per layout into the
canonical one (timm's names), the layout of a state dict told from its keys, and names
from a file shown in messages as they are in the file.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Tuple

import numpy as np

from convmixer_tf.errors import BadInput

IGNORED_SUFFIXES = (".num_batches_tracked",)  # BatchNorm bookkeeping, not a weight


class MappingError(BadInput):
    """The tensors do not form a ConvMixer checkpoint (bad input: exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family of checkpoints names ConvMixer's modules. `modules` maps each canonical
    module to this layout's name for it: in a block's row {i+N} is the block's index plus N,
    in the head's row {depth+N} the number of blocks plus N (pooling and flattening sit
    between the last block and the head, and hold no weights)."""

    description: str
    modules: Dict[str, str]


LAYOUTS = {
    "timm": Layout(
        "timm's ConvMixer",
        {
            "stem.0": "stem.0",
            "stem.2": "stem.2",
            "blocks.{i}.0.fn.0": "blocks.{i}.0.fn.0",
            "blocks.{i}.0.fn.2": "blocks.{i}.0.fn.2",
            "blocks.{i}.1": "blocks.{i}.1",
            "blocks.{i}.3": "blocks.{i}.3",
            "head": "head",
        },
    ),
    "sequential": Layout(
        "the paper's nn.Sequential listing",
        {
            "stem.0": "0",
            "stem.2": "2",
            "blocks.{i}.0.fn.0": "{i+3}.0.fn.0",
            "blocks.{i}.0.fn.2": "{i+3}.0.fn.2",
            "blocks.{i}.1": "{i+3}.1",
            "blocks.{i}.3": "{i+3}.3",
            "head": "{depth+5}",
        },
    ),
    "one_liner": Layout(
        "the paper's 280-character one-liner",
        {
            "stem.0": "0.0",
            "stem.2": "0.2",
            "blocks.{i}.0.fn.0": "{i+1}.0.0.0",
            "blocks.{i}.0.fn.2": "{i+1}.0.0.2",
            "blocks.{i}.1": "{i+1}.1.0",
            "blocks.{i}.3": "{i+1}.1.2",
            "head": "{depth+3}",
        },
    ),
    "labml": Layout(
        "labml.ai's annotated ConvMixer",
        {
            "stem.0": "patch_emb.conv",
            "stem.2": "patch_emb.norm",
            "blocks.{i}.0.fn.0": "conv_mixer_layers.{i}.depth_wise_conv",
            "blocks.{i}.0.fn.2": "conv_mixer_layers.{i}.norm1",
            "blocks.{i}.1": "conv_mixer_layers.{i}.point_wise_conv",
            "blocks.{i}.3": "conv_mixer_layers.{i}.norm2",
            "head": "classification.linear",
        },
    ),
}
_FIELD = re.compile(r"\{(i|depth)(?:\+(\d+))?\}")
_MAX_DIGITS = 9  # a block index longer than this is no network's


def _filled(template: str, **values: int) -> str:
    return _FIELD.sub(lambda m: str(values[m.group(1)] + int(m.group(2) or 0)), template)


def modules(layout: str, depth: int) -> Dict[str, str]:
    """Canonical module -> `layout`'s name for it, for a network of `depth` blocks."""
    table = {}
    for canonical, named in _layout(layout).modules.items():
        blocks = range(depth) if "{i}" in canonical else range(1)
        for i in blocks:
            table[_filled(canonical, i=i)] = _filled(named, i=i, depth=depth)
    return table


def _layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise MappingError(f"unknown layout {shown(name)}; allowed values: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def depth_of(keys, layout: str) -> int:
    """How many blocks `keys` hold in `layout`: up to the last block position its block
    modules' keys name (a block missing in between is then named as missing), or, when
    that is more blocks than there are keys, the positions there are."""
    positions = set()
    for canonical, template in _layout(layout).modules.items():
        if "{i}" not in canonical:
            continue
        field = _FIELD.search(template)
        pattern = re.compile(
            re.escape(template[: field.start()])
            + rf"(\d{{1,{_MAX_DIGITS}}})"
            + re.escape(template[field.end() :] + ".")
        )
        offset = int(field.group(2) or 0)
        found = (pattern.match(key) for key in keys)
        positions |= {int(m.group(1)) - offset for m in found if m}
    positions = {p for p in positions if p >= 0}
    if positions and max(positions) < len(keys):
        return max(positions) + 1
    return len(positions)


def _recognised(keys, layout: str) -> set:
    """The keys `layout` has a name for."""
    known = set(modules(layout, depth_of(keys, layout)).values())
    return {key for key in keys if key.rpartition(".")[0] in known}


def layout_of(keys) -> Tuple[str, int]:
    """(layout, depth) of a state dict's `keys`: the layout that names the most of them.
    MappingError when none names any, or when the keys mix two layouts."""
    keys = [k for k in keys if not k.endswith(IGNORED_SUFFIXES)]
    known = {name: _recognised(keys, name) for name in LAYOUTS}
    best = max(LAYOUTS, key=lambda name: len(known[name]))
    if not known[best]:
        tried = "; ".join(f"{name} ({layout.description})" for name, layout in LAYOUTS.items())
        raise MappingError(
            f"not a ConvMixer checkpoint: its keys follow none of the layouts tried: {tried}; "
            f"first keys: {', '.join(shown(k) for k in sorted(keys)[:5])}"
        )
    _check_unmixed(known, best)
    return best, depth_of(keys, best)


def _check_unmixed(known: dict, layout: str) -> None:
    for other, keys in known.items():
        extra = sorted(keys - known[layout])
        if extra:
            raise MappingError(
                f"the keys mix two layouts: {len(known[layout])} of {layout} "
                f"({LAYOUTS[layout].description}) and {len(extra)} of {other} "
                f"({LAYOUTS[other].description}), such as {shown(extra[0])}; a checkpoint holds one"
            )


def to_canonical(
    state_dict: Dict[str, np.ndarray], layout: Optional[str] = None
) -> Tuple[Dict[str, np.ndarray], str]:
    """Renames `state_dict` to timm's keys; returns (renamed dict, layout it came in). Keys
    the layout has no name for stay as they are (the plan reports them as unexpected)."""
    if layout is None:
        layout, depth = layout_of(state_dict)
    else:
        depth = depth_of(state_dict, layout)
    canonical = {named: module for module, named in modules(layout, depth).items()}
    out = {}
    for key, value in state_dict.items():
        new = _renamed(key, canonical)
        if new in out:
            raise MappingError(
                f"two keys name the same tensor of a {layout} checkpoint: {shown(key)}"
            )
        out[new] = value
    return out, layout


def from_canonical(
    state_dict: Dict[str, np.ndarray], layout: str, depth: int
) -> Dict[str, np.ndarray]:
    """Renames canonical (timm) keys to `layout`."""
    table = modules(layout, depth)
    return {_renamed(key, table): value for key, value in state_dict.items()}


def original_key(key: str, layout: str, depth: int) -> str:
    """`layout`'s name for the canonical `key` (a key the layout has no name for is its
    own): what an error message names."""
    return _renamed(key, modules(layout, depth))


def _renamed(key: str, table: Dict[str, str]) -> str:
    """`key` with its module renamed by `table` (module -> module); a module the table
    does not name stays as it is."""
    module, _, weight = key.rpartition(".")
    return f"{table[module]}.{weight}" if module in table else key


def shown(name, limit: int = 80) -> str:
    """A key, or any name from outside, as an error message shows it: quoted, its control and
    format characters escaped (repr), cut after `limit` characters."""
    text = str(name)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def printable(text: str) -> str:
    """`text` with each character that is not printable escaped, as repr escapes it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
