"""Safe reading of checkpoint files: tensors come out, no code from the file runs.

Torch files go through `torch.load(weights_only=True)` (a restricted unpickler that
refuses any global it does not know); `.safetensors` through safetensors, which needs
no torch at all. Wrappers (`state_dict`, `state_dict_ema`, `model`) and the `module.`
prefix of DataParallel/DDP are peeled off here, so callers see one flat dict of numpy
arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import stat
import zipfile
from typing import Dict

import numpy as np

from convmixer_tf.errors import BadInput, one_line
from weights_converter.layouts import printable, shown

SAFETENSORS_SUFFIXES = (".safetensors",)
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
# torch.compile wraps modules in `_orig_mod`; DataParallel/DDP in `module`.
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(BadInput):
    """The file is not a readable ConvMixer checkpoint (bad input: exit code 2)."""


@dataclasses.dataclass
class Checkpoint:
    """A flat state dict plus how it was found: `summary` holds the path, the file format
    ("torch" or "safetensors"), the wrapper (the dict key the weights sat under, None for a
    bare state dict), the stripped prefixes, the other keys (what else the file carried:
    optimizer, epoch, args, ...), the number of tensors and their dtypes."""

    state_dict: Dict[str, np.ndarray]
    summary: dict


def load_state_dict(path, use_ema: bool = False) -> Dict[str, np.ndarray]:
    """Reads the weights of a checkpoint as {key: float32/int numpy array}.

    Args:
        path: a `.pth`, `.pth.tar`, `.pt`, `.bin` (torch zip or legacy pickle) or
            `.safetensors` file.
        use_ema: take the EMA weights (`state_dict_ema`) of a timm training checkpoint.

    Example:
        >>> sd = load_state_dict("convmixer_768_32.pth.tar")  # doctest: +SKIP
        >>> sd["stem.0.weight"].shape  # doctest: +SKIP
        (768, 3, 7, 7)
    """
    return read_checkpoint(path, use_ema=use_ema).state_dict


def read_checkpoint(path, use_ema: bool = False) -> Checkpoint:
    """Like `load_state_dict`, keeping what was learned about the file on the way."""
    path = os.fspath(path)
    _check_regular_file(path)
    if path.endswith(SAFETENSORS_SUFFIXES) or _looks_like_safetensors(path):
        raw, fmt = _read_safetensors(path), "safetensors"
    else:
        raw, fmt = _read_torch(path), "torch"
    tensors, wrapper, other = _unwrap(raw, use_ema, path)
    tensors, prefixes = _strip_prefixes(tensors)
    summary = {
        "path": path,
        "file_format": fmt,
        "wrapper": wrapper,
        "stripped_prefixes": prefixes,
        "other_keys": other,
        "tensors": len(tensors),
        "dtypes": sorted({str(value.dtype) for value in tensors.values()}),
    }
    return Checkpoint({key: _to_numpy(key, value) for key, value in tensors.items()}, summary)


def _check_regular_file(path) -> None:
    """CheckpointError unless `path` is a regular file with something in it: a named pipe
    would block the read until a writer comes, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {shown(path, 1000)}") from None
    except OSError as err:
        raise CheckpointError(
            f"cannot read checkpoint {shown(path, 1000)}: {err.strerror}"
        ) from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"checkpoint {shown(path, 1000)} is a folder, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"checkpoint {shown(path, 1000)} is not a regular file (a pipe, a device or a socket)"
        )
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {shown(path, 1000)}")


def _looks_like_safetensors(path) -> bool:
    # A safetensors file starts with a little-endian u64 header length, then '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _utf8(path) -> bool:
    """Whether the libraries that take a file name (they encode it as UTF-8) can open it; a
    name that is not UTF-8 (os.listdir's surrogate escapes) is opened here instead."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def _read_safetensors(path):
    try:
        from safetensors import torch as reader  # every dtype, bfloat16 included
    except ImportError:
        try:
            from safetensors import numpy as reader  # no torch: numpy has no bfloat16
        except ImportError:
            raise CheckpointError(
                "reading .safetensors needs the safetensors package: pip install safetensors"
            ) from None
    try:
        if _utf8(path):
            return reader.load_file(path)
        with open(path, "rb") as f:
            return reader.load(f.read())
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"cannot read safetensors file {shown(path, 1000)}: "
            f"{printable(one_line(err, named=True))[:300]}"
        ) from None


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading {shown(os.path.basename(path))} needs torch (pip install "
            "'convmixer-tf[torch]'), or convert it to .safetensors first"
        ) from None
    # timm training checkpoints carry their argparse.Namespace; building one runs no code.
    safe = [argparse.Namespace]
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        zipped = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # is_zipfile lets out a zip64 record's disk count
        zipped = True  # a damaged zip, which _check_stored names
    if zipped:
        _check_stored(path)
    try:
        with torch.serialization.safe_globals(safe):
            if not _utf8(path):
                with open(path, "rb") as f:
                    return torch.load(f, **kwargs)
            # mmap (torch.save's zip alone): tensors are paged in from the file, not copied.
            return torch.load(path, mmap=zipped, **kwargs)
    except Exception as err:
        message = one_line(err, named=True)
        found = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", message)
        if "Weights only load failed" in message and found:
            raise CheckpointError(
                f"refused {shown(path, 1000)}: loading it would call `{found.group(1)}`, i.e. run "
                "code from the file; nothing from it was executed"
            ) from None
        detail = re.search(
            r"WeightsUnpickler error:\s*(.+?)\s*Check the documentation", str(err), re.S
        )
        if detail:
            message = f"unpickling error: {' '.join(detail.group(1).split())}"
        raise CheckpointError(
            f"cannot read torch checkpoint {shown(path, 1000)} (truncated or not a torch file?): "
            f"{printable(message)[:300]}"
        ) from None


def _check_stored(path) -> None:
    """torch.save stores its zip's members as they are; a compressed member can inflate to
    any size when torch reads it (a zip bomb), so it is refused before torch opens the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception as err:  # zipfile raises many kinds for a damaged archive
        raise CheckpointError(
            f"cannot read torch checkpoint {shown(path, 1000)} (a damaged zip): "
            f"{printable(one_line(err))[:300]}"
        ) from None
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"cannot read torch checkpoint {shown(path, 1000)}: its member "
                f"{shown(member.filename)} is compressed, and torch.save never compresses "
                "(a zip bomb, or not a file torch.save wrote)"
            )


def _is_tensor(value) -> bool:
    # an argparse.Namespace (timm's training args, which the unpickler may build) carries any
    # attribute, `shape` too
    return hasattr(value, "shape") and not isinstance(value, argparse.Namespace)


def _is_tensor_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())
    )


def _unwrap(raw, use_ema, path):
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(
            f"{shown(path, 1000)} holds a {type(raw).__name__}, not a dict of tensors"
        )
    keys = [k for k in raw if isinstance(k, str)]
    named = f"[{', '.join(shown(k) for k in list(raw)[:10])}]"  # what a message names
    wrappers = EMA_KEYS if use_ema else WRAPPER_KEYS
    for key in wrappers:
        if _is_tensor_dict(raw.get(key)):
            return raw[key], key, sorted(k for k in keys if k != key)
    if use_ema:
        raise CheckpointError(
            f"--use-ema: {shown(path, 1000)} has no EMA weights (looked for "
            f"{', '.join(EMA_KEYS)}); it holds {named}"
        )
    if _is_tensor_dict(raw):
        return raw, None, []
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and _is_tensor(v)}
    if not tensors:
        note = (
            "" if len(keys) == len(raw) else " (a state dict is keyed by parameter names, strings)"
        )
        raise CheckpointError(
            f"{shown(path, 1000)} holds no state dict: top-level keys {named}, none of "
            f"{', '.join(WRAPPER_KEYS)} with tensors in it{note}"
        )
    others = f"[{', '.join(shown(k) for k in sorted(set(keys) - set(tensors))[:10])}]"
    raise CheckpointError(
        f"{shown(path, 1000)}: top-level dict mixes tensors with non-tensor entries {others}"
    )


def _strip_prefixes(tensors):
    """(`tensors` with the wrappers' prefixes that all keys share taken off, one at a time,
    those prefixes)."""
    stripped = []
    while tensors:
        shared = [p for p in STRIPPABLE_PREFIXES if all(k.startswith(p) for k in tensors)]
        if not shared:
            break
        tensors = {k[len(shared[0]) :]: v for k, v in tensors.items()}
        stripped.append(shared[0])
    return tensors, stripped


def _to_numpy(key, value):
    """A tensor as a numpy array (fp16/bf16 computed in float32); CheckpointError for what is
    no dense array of its own: a sparse or quantized tensor, a meta tensor, a view that
    repeats fewer stored values than it has elements (tiny on disk, any size in memory)."""
    if not isinstance(value, np.ndarray):  # a torch tensor
        value = _dense(key, value)
    if value.dtype.kind == "f" and value.dtype != np.float32:
        return value.astype(np.float32)
    return value


def _dense(key, tensor) -> np.ndarray:
    if tensor.is_sparse or str(tensor.layout) != "torch.strided":
        raise CheckpointError(f"tensor {shown(key)} is a sparse tensor, not a dense weight")
    if tensor.is_quantized:
        raise CheckpointError(
            f"tensor {shown(key)} is a quantized tensor: convert the float model's checkpoint"
        )
    try:
        stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > stored:
            raise CheckpointError(
                f"tensor {shown(key)} repeats {stored} stored values as {tensor.numel()} "
                "(an expanded view, not a weight)"
            )
        if tensor.is_floating_point():
            tensor = tensor.detach().float()
        return tensor.detach().numpy()
    except (TypeError, RuntimeError, NotImplementedError, ValueError) as err:
        raise CheckpointError(
            f"tensor {shown(key)} cannot be read as an array: {printable(one_line(err))[:200]}"
        ) from None
