"""Where a checkpoint comes from: a file, or a Hugging Face Hub id in timm's spelling,
`hf-hub:OWNER/NAME[@REVISION]`, resolved with `huggingface_hub` (online it downloads;
offline, `HF_HUB_OFFLINE=1`, or whenever the file is there, it reads the cache that
`HF_HOME` / `HF_HUB_CACHE` name).

A timm repo's `config.json` beside the weights says how they expect their input (mean,
std, crop_pct, interpolation, input size), and may name the classes: those facts travel
with the converted model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: safetensors first


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint file and what is known of where it came from."""

    path: str
    repo: Optional[str] = None
    revision: Optional[str] = None
    commit: Optional[str] = None
    config: Optional[dict] = None

    def facts(self) -> dict:
        """What the source says of the weights: {"preprocessing", "class_names", "source"}."""
        if self.repo is None:
            return {"source": {"file": os.path.basename(self.path)}}
        cfg = dict(self.config or {})
        pretrained = dict(cfg.get("pretrained_cfg") or {}) if "pretrained_cfg" in cfg else cfg
        source = {"repo": self.repo, "revision": self.revision or "main", "commit": self.commit,
                  "file": os.path.basename(self.path), "license": pretrained.get("license"),
                  "architecture": cfg.get("architecture")}
        names = cfg.get("label_names") or pretrained.get("label_names")
        return {"preprocessing": _preprocessing(pretrained), "class_names": tuple(names) if names else None,
                "source": source}


def _preprocessing(pretrained: dict):
    from convmixer_tf.config import Preprocessing

    if not {"mean", "std"} <= set(pretrained):
        return None
    size = (pretrained.get("input_size") or [3, 224, 224])[-1]
    return Preprocessing(input_size=int(size), crop_pct=float(pretrained.get("crop_pct", 0.875)),
                         interpolation=pretrained.get("interpolation", "bicubic"),
                         mean=tuple(map(float, pretrained["mean"])), std=tuple(map(float, pretrained["std"])))


def is_hub_id(text) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def parse(text: str):
    """`hf-hub:OWNER/NAME[@REVISION]` -> (repo, revision or None); ValueError otherwise."""
    repo, _, revision = text[len(PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"a Hub id is {PREFIX}OWNER/NAME[@REVISION], got {text!r}")
    return repo, revision or None


def resolve(checkpoint) -> Source:
    """The file behind `checkpoint` (a path, or a Hub id) and its repo's config.json."""
    if not is_hub_id(checkpoint):
        return Source(os.fspath(checkpoint))
    repo, revision = parse(checkpoint)
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ValueError(f"{checkpoint} needs huggingface_hub: pip install huggingface_hub") from None
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
            raise ValueError(f"no repo {repo} on the Hugging Face Hub (or it is private)") from None
    if path is None and uncached and not _cached_snapshot(repo, revision):
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise ValueError(f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and {how}; fetch it where the Hub is reachable: "
                         f"hf download {repo}{' --revision ' + revision if revision else ''}")
    if path is None:
        where = " in the cache (hf download fetches all of a repo)" if uncached else ""
        raise ValueError(f"{repo} holds no ConvMixer weights{where}: neither {' nor '.join(WEIGHT_FILES)}")
    config = _optional_json(hf_hub_download, repo, revision)
    commit = os.path.basename(os.path.dirname(path)) if "snapshots" in path else None
    return Source(path, repo, revision, commit, config)


def _cached_snapshot(repo, revision) -> Optional[str]:
    """The cached snapshot folder of `repo` at `revision`, when there is one."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, in any of the ways it can say so
        return None


def _optional_json(download, repo, revision) -> Optional[dict]:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        with open(download(repo, "config.json", revision=revision)) as f:
            data = json.load(f)
    except (EntryNotFoundError, LocalEntryNotFoundError, ValueError):  # none (here), or not JSON: weights alone
        return None
    return data if isinstance(data, dict) else None
