"""Where a checkpoint comes from: a file, or a Hugging Face Hub id in timm's spelling,
`hf-hub:OWNER/NAME[@REVISION]`, resolved with `huggingface_hub` (online it downloads;
offline, `HF_HUB_OFFLINE=1`, or whenever the file is there, it reads the cache that
`HF_HOME` / `HF_HUB_CACHE` name).

A timm repo's `config.json` beside the weights says how they expect their input (mean,
std, crop_pct, interpolation, input size), and may name the classes: timm calls that the
weights' pretrained_cfg, and it travels with the converted model as part of its facts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import re
import reprlib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from convmixer_tf.errors import BadInput, one_line
from weights_converter.layouts import printable, shown

PREFIX = "hf-hub:"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # the Hub's OWNER/NAME
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first
# A Hub that answers at all answers a bare HEAD request within this; without a network,
# huggingface_hub alone retries each file for most of a minute.
PROBE_TIMEOUT_S = 3.0
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
    """data[key] when it is a `kind`, a list of strings for a list (null or absent: None);
    BadInput otherwise."""
    value = data.get(key)
    strings = not isinstance(value, list) or all(isinstance(item, str) for item in value)
    if value is not None and not (isinstance(value, kind) and strings):
        wanted = {dict: "an object", list: "a list of strings"}.get(kind, f"a {kind.__name__}")
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
    """The file behind `checkpoint` (a path, or a Hub id) and its repo's config.json.

    A Hub id is read from the cache when the cache holds its weights (the Hub is not asked
    whether they changed: `hf download` refreshes them). Otherwise one short request asks
    whether the Hub (HF_ENDPOINT) answers at all before anything downloads, so that
    without a network the answer is NotReachable within seconds, not after
    huggingface_hub's retries."""
    if not is_hub_id(checkpoint):
        return Source(os.fspath(checkpoint), pretrained_cfg(checkpoint))
    repo, revision = parse(checkpoint)
    try:  # its lazy loader prints a failed import on stdout, where our results go
        with contextlib.redirect_stdout(io.StringIO()):
            from huggingface_hub import hf_hub_download  # noqa: F401 - whether it starts
    except ImportError:
        raise BadInput(f"{checkpoint} needs huggingface_hub: pip install huggingface_hub") from None
    except ValueError as err:  # it reads HF_ENDPOINT as it is imported
        raise BadInput(
            f"huggingface_hub refuses its settings ({printable(one_line(err))}): check HF_ENDPOINT"
        ) from None
    path = _weights(repo, revision, local=True)
    cached = path is not None
    if not cached:
        _check_reachable(repo, revision)
        path = _weights(repo, revision, local=False)
    if path is None:
        raise BadInput(f"{repo} holds no ConvMixer weights: neither {' nor '.join(WEIGHT_FILES)}")
    config = _optional_json(repo, revision, local=cached)
    cfg = pretrained_cfg(path, repo=repo, revision=revision, config=config)
    return Source(path, cfg, config)


def _weights(repo, revision, *, local: bool) -> Optional[str]:
    """The first of WEIGHT_FILES the repo holds (`_fetch`); None when it holds neither."""
    for name in WEIGHT_FILES:
        path = _fetch(repo, name, revision, local=local)
        if path is not None:
            return path
    return None


def _fetch(repo, name, revision, *, local: bool) -> Optional[str]:
    """`name` of the repo at `revision`, from the cache alone (`local`: no request at all,
    not even huggingface_hub's own for its headers) or from the Hub; None when the repo
    has no such file (in the cache)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if local:
        found = try_to_load_from_cache(repo, name, revision=revision)
        return found if isinstance(found, str) else None  # else absent, or known absent
    try:
        return hf_hub_download(repo, name, revision=revision)
    except LocalEntryNotFoundError:  # (a kind of EntryNotFoundError): the Hub stopped answering
        raise _not_reachable(repo, revision, "the Hub stopped answering") from None
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError:
        raise BadInput(f"no repo {repo} on the Hugging Face Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise BadInput(f"{repo} has no revision {revision!r} on the Hugging Face Hub") from None


def _check_reachable(repo, revision) -> None:
    """NotReachable, within PROBE_TIMEOUT_S, unless the Hub may be asked for `repo`: not
    with HF_HUB_OFFLINE set, nor when its endpoint gives no answer. Offline, a snapshot in
    the cache without weights is BadInput: fetching the rest of it is what would help."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _silence(constants.ENDPOINT)
    if why is None:
        return
    if _cached_snapshot(repo, revision):
        raise BadInput(
            f"{repo} holds no ConvMixer weights in the cache (hf download fetches all of a "
            f"repo): neither {' nor '.join(WEIGHT_FILES)}, and {why}"
        )
    raise _not_reachable(repo, revision, why)


def _silence(endpoint: str) -> Optional[str]:
    """Why `endpoint` cannot be reached (not an http(s) URL, refused, unresolved, no answer
    within PROBE_TIMEOUT_S), None when it answers at all, an HTTP error or a certificate
    this Python does not trust included: huggingface_hub then has its say."""
    try:
        _check_url(endpoint)
        request = urllib.request.Request(endpoint, method="HEAD")
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError, http.client.HTTPException) as err:  # a timeout, a bad URL
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):
            return None
        return f"the Hub cannot be reached at {shown(endpoint)} ({printable(one_line(reason))})"
    return None


def _check_url(endpoint: str) -> None:
    """ValueError unless `endpoint` is an http(s) URL with a host and a port that can be."""
    if not endpoint.isprintable() or " " in endpoint:
        raise ValueError("HF_ENDPOINT holds a space or a control character")
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("HF_ENDPOINT is not an http(s) URL")
    if parts.port == 0:  # (the property itself refuses a port past 65535)
        raise ValueError("HF_ENDPOINT names port 0")


def _not_reachable(repo, revision, why: str) -> NotReachable:
    from huggingface_hub import constants

    return NotReachable(
        f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {why}; fetch it where the Hub is reachable: "
        f"hf download {repo}{' --revision ' + revision if revision else ''}"
    )


def _cached_snapshot(repo, revision) -> bool:
    """Whether the cache holds a snapshot of `repo` at `revision` (a branch, a tag or a
    commit), read from its layout: snapshot_download would ask the Hub for its headers."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"))
    ref = os.path.join(folder, "refs", revision or "main")
    try:
        with open(ref, encoding="ascii") as f:
            commit = f.read().strip()
    except (OSError, ValueError):  # no such ref: the revision may be a commit
        commit = revision or "main"
    return os.path.isdir(os.path.join(folder, "snapshots", commit))


def _optional_json(repo, revision, *, local: bool) -> Optional[dict]:
    """The repo's config.json as a dict, None when it has none; BadInput when it is there but
    is not a JSON object. Weights read from the cache take their config from it too."""
    path = _fetch(repo, "config.json", revision, local=local)
    if path is None:  # none: the weights alone
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
