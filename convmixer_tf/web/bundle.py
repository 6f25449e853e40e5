"""MediaPipe Tasks for Web, the npm package the page runs: the files the page loads, and the
copy of them a wheel carries (in `PACKAGED`, beside the Apache-2.0 text and a NOTICE).

The standard library only: setup.py runs this file by its path while building a wheel or
a source archive, before anything is installed.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

MEDIAPIPE_PACKAGE = "@mediapipe/tasks-vision"
MEDIAPIPE_VERSION = "1.1.0"  # package.json and package-lock.json pin the same (tested)
# FilesetResolver picks the SIMD build, or the other where the browser has no SIMD.
MEDIAPIPE_FILES = (
    "vision_bundle.mjs",
    "wasm/vision_wasm_internal.js",
    "wasm/vision_wasm_internal.wasm",
    "wasm/vision_wasm_nosimd_internal.js",
    "wasm/vision_wasm_nosimd_internal.wasm",
)
# The copy a wheel carries. The folder holds only LICENSE in the repository: the build
# fills in the rest (setup.py).
PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks-vision")
LICENSE = "LICENSE"  # the npm package ships none; its package.json says Apache-2.0
NOTICE = "NOTICE"
METADATA = "package.json"


def missing(folder: str) -> List[str]:
    """The page's files that `folder` (a copy of the npm package) lacks."""
    return [f for f in MEDIAPIPE_FILES if not os.path.isfile(os.path.join(folder, *f.split("/")))]


def version(folder: str) -> Optional[str]:
    """The version in the package.json of `folder`; None where there is none to read."""
    try:
        with open(os.path.join(folder, METADATA), encoding="utf-8") as f:
            found = json.load(f).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def copy(source: str, target: str) -> None:
    """Copies the page's files of the npm package folder `source`, with its package.json,
    into `target`, beside LICENSE (the Apache-2.0 text) and a NOTICE naming the package and
    its version. ValueError when `source` lacks a file or holds another version than the
    one the page is written for."""
    lacking = missing(source)
    found = version(source)
    if lacking or found != MEDIAPIPE_VERSION:
        problem = f"lacks {', '.join(lacking)}" if lacking else f"holds version {found}"
        raise ValueError(
            f"{source} {problem}: the page needs {MEDIAPIPE_PACKAGE} {MEDIAPIPE_VERSION} "
            "(run `npm ci` in the repository)"
        )
    for name in (*MEDIAPIPE_FILES, METADATA):
        path = os.path.join(target, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(os.path.join(source, *name.split("/")), path)
    shutil.copyfile(os.path.join(PACKAGED, LICENSE), os.path.join(target, LICENSE))
    with open(os.path.join(target, NOTICE), "w", encoding="utf-8") as f:
        f.write(notice())


def notice() -> str:
    return (
        f"The files in this folder are {MEDIAPIPE_PACKAGE} {MEDIAPIPE_VERSION} (npm), MediaPipe "
        "Tasks for Web by Google (mediapipe@google.com),\nlicensed under the Apache License, "
        "Version 2.0 "
        '(its package.json says "Apache-2.0"), copied unchanged.\nThe npm package ships no '
        "licence file: LICENSE beside this file is the licence's text.\n"
    )
