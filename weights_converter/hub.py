"""Where a checkpoint comes from: a file, or a Hugging Face Hub id in timm's spelling,
`hf-hub:OWNER/NAME[@REVISION]`, resolved with `huggingface_hub` (online it downloads;
offline, `HF_HUB_OFFLINE=1`, or whenever the file is there, it reads the cache that
`HF_HOME` / `HF_HUB_CACHE` name).

A timm repo's `config.json` beside the weights says how they expect their input (mean,
std, crop_pct, interpolation, input size), and may name the classes: timm calls that the
weights' pretrained_cfg, and it travels with the converted model as part of its facts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import reprlib
from typing import Optional

from convmixer_tf.errors import BadInput, one_line
from weights_converter.layouts import printable

PREFIX = "hf-hub:"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # the Hub's OWNER/NAME
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first
MAX_CONFIG_BYTES = 1 << 24  # timm's config.json is tens of kB, the names of 1000 classes
_SHOWN = reprlib.Repr()  # for values nested too deep for JSON's writer
_SHOWN.maxlevel = 3


class NotReachable(BadInput):
    """A Hub id that is neither in the cache nor downloadable now (offline, or no network)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint file, its repo's config.json (None: a file, or a repo without one) and
    what they say of the weights (`pretrained_cfg`), checked before any weights are read."""

    path: str
    pretrained_cfg: dict
    config: Optional[dict] = None


def _file_name(path) -> str:
    """The file's name as text that any writer can encode: a name that is not UTF-8 keeps
    its odd bytes as \\xNN."""
    return os.fsencode(os.path.basename(path)).decode("utf-8", "backslashreplace")


def pretrained_cfg(path, *, repo=None, revision=None, config=None) -> dict:
    """What a source says of its weights, in timm's word their pretrained_cfg:
    {"preprocessing" (None without mean and std), "class_names", "source" (repo, revision,
    commit, file, license, architecture)}, each value of the repo's config.json checked as
    it enters (BadInput names the field and what it may be). A file says its name alone;
    one in the Hugging Face cache, its snapshot's folder, the commit."""
    if repo is None:
        return {"source": {"file": _file_name(path)}}
    config = config or {}
    where = f"config.json of {PREFIX}{repo}"
    cfg = _field(config, "pretrained_cfg", dict, where)
    pretrained, prefix = (config, "") if cfg is None else (cfg, "pretrained_cfg.")
    names = _field(config, "label_names", list, where)
    if names is None:
        names = _field(pretrained, "label_names", list, where, prefix=prefix)
        field = f"{prefix}label_names"
    else:
        field = "label_names"
    if names is not None and not all(isinstance(name, str) for name in names):
        raise BadInput(f"{where}: {field} must be a list of strings, got {_shown(names)}")
    preprocessing = _preprocessing(pretrained, where, prefix)
    source = {
        "repo": repo,
        "revision": revision or "main",
        "commit": os.path.basename(os.path.dirname(path)) if "snapshots" in path else None,
        "file": _file_name(path),
        "license": _field(pretrained, "license", str, where, prefix=prefix),
        "architecture": _field(config, "architecture", str, where),
    }
    class_names = tuple(names) if names else None
    return {"preprocessing": preprocessing, "class_names": class_names, "source": source}


def _field(data: dict, key: str, kind: type, where: str, *, prefix: str = ""):
    """data[key] when it is a `kind` (null or absent: None); BadInput otherwise."""
    value = data.get(key)
    if value is not None and not isinstance(value, kind):
        wanted = "an object" if kind is dict else f"a {kind.__name__}"
        raise BadInput(f"{where}: {prefix}{key} must be {wanted}, got {_shown(value)}")
    return value


def _shown(value) -> str:
    """A value from the file in a message, as JSON (escaped) cut short."""
    try:
        text = json.dumps(value)
    except RecursionError:
        text = _SHOWN.repr(value)
    return printable(text[:60])


def _preprocessing(pretrained: dict, where: str, prefix: str):
    """The Preprocessing of timm's pretrained_cfg (input_size [3, H, H], crop_pct, interpolation,
    mean, std), or None when it names no mean and std."""
    from convmixer_tf.config import Preprocessing

    if "mean" not in pretrained and "std" not in pretrained:
        return None
    size = pretrained.get("input_size", [3, 224, 224])
    square = isinstance(size, list) and len(size) == 3 and size[0] == 3 and size[1] == size[2]
    if not square:
        raise BadInput(
            f"{where}: {prefix}input_size must be [3, SIZE, SIZE] (a square RGB input), "
            f"got {_shown(size)}"
        )
    values = {
        "input_size": size[2],
        "crop_pct": pretrained.get("crop_pct", 0.875),
        "interpolation": pretrained.get("interpolation", "bicubic"),
        "mean": pretrained.get("mean"),
        "std": pretrained.get("std"),
    }
    try:
        return Preprocessing(**values)
    except BadInput as err:
        raise BadInput(f"{where}: {prefix}{err}") from None


def is_hub_id(text) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def parse(text: str):
    """`hf-hub:OWNER/NAME[@REVISION]` -> (repo, revision or None); BadInput otherwise."""
    repo, _, revision = text[len(PREFIX) :].partition("@")
    if not REPO_ID.fullmatch(repo):
        raise BadInput(
            f"a Hub id is {PREFIX}OWNER/NAME[@REVISION] (letters, digits, '-', '_', '.'), got {text!r}"
        )
    return repo, revision or None


def resolve(checkpoint) -> Source:
    """The file behind `checkpoint` (a path, or a Hub id) and its repo's config.json."""
    if not is_hub_id(checkpoint):
        return Source(os.fspath(checkpoint), pretrained_cfg(checkpoint))
    repo, revision = parse(checkpoint)
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise BadInput(f"{checkpoint} needs huggingface_hub: pip install huggingface_hub") from None
    path, uncached = None, False
    for name in WEIGHT_FILES:
        try:
            path = hf_hub_download(repo, name, revision=revision)
            break
        except LocalEntryNotFoundError:  # (a kind of EntryNotFoundError)
            uncached = True
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError:
            raise BadInput(f"no repo {repo} on the Hugging Face Hub (or it is private)") from None
    if path is None and uncached and not _cached_snapshot(repo, revision):
        how = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        )
        raise NotReachable(
            f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {how}; fetch it where the Hub is reachable: "
            f"hf download {repo}{' --revision ' + revision if revision else ''}"
        )
    if path is None:
        where = " in the cache (hf download fetches all of a repo)" if uncached else ""
        raise BadInput(
            f"{repo} holds no ConvMixer weights{where}: neither {' nor '.join(WEIGHT_FILES)}"
        )
    config = _optional_json(hf_hub_download, repo, revision)
    cfg = pretrained_cfg(path, repo=repo, revision=revision, config=config)
    return Source(path, cfg, config)


def _cached_snapshot(repo, revision) -> Optional[str]:
    """The cached snapshot folder of `repo` at `revision`, when there is one."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, in any of the ways it can say so
        return None


def _optional_json(download, repo, revision) -> Optional[dict]:
    """The repo's config.json as a dict, None when it has none; BadInput when it is there but
    is not a JSON object."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = download(repo, "config.json", revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError):  # none (here): the weights alone
        return None
    with open(path, "rb") as f:  # a byte more than a config may hold, for parse_config to refuse
        return parse_config(f.read(MAX_CONFIG_BYTES + 1), f"config.json of {PREFIX}{repo}")


def parse_config(data: bytes, where: str) -> dict:
    """The JSON object in `data` (a config.json); BadInput naming `where` for anything else:
    not JSON, not UTF-8, nested too deep, too long, not an object."""
    if len(data) > MAX_CONFIG_BYTES:
        raise BadInput(f"{where} holds more than {MAX_CONFIG_BYTES} bytes; a config has kilobytes")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise BadInput(
            f"{where} cannot be read as JSON ({printable(one_line(err))[:200]}); fix or remove it"
        ) from None
    if not isinstance(config, dict):
        raise BadInput(f"{where} must be a JSON object, got {_shown(config)}")
    return config
