"""Try a .tflite file in a browser: a page that runs it, the very file a phone app ships,
through MediaPipe Tasks for Web's ImageClassifier (the C++ task graph of Android and iOS,
built to WebAssembly), on the CPU of the device that opens it.

A `Site` is every file of the page, by the name it is served under: the page itself
(`page/`), `model.tflite` (the file given, whatever its name), `config.json` (what the
page shows of the model: its facts, read from the file) and MediaPipe's files (from the
npm package `@mediapipe/tasks-vision`: the copy a wheel carries, or node_modules/ of the
repository after `npm ci`; see `bundle`). `serving.server` serves those names and nothing
else, from the page's own origin, under a Content Security Policy that lets no request
leave it; `Site.write` writes them as a static folder. `python -m convmixer_tf.web` is
the command line. Importing this loads no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from typing import BinaryIO, Dict, Optional, Union

from convmixer_tf.errors import BadInput
from convmixer_tf.outputs import write_atomic
from convmixer_tf.web.bundle import (
    MEDIAPIPE_FILES,
    MEDIAPIPE_PACKAGE,
    MEDIAPIPE_VERSION,
    PACKAGED,
    missing,
)

PAGE_FILES = ("index.html", "app.js", "style.css")
MODEL = "model.tflite"
CONFIG = "config.json"
WRITTEN_BY = "convmixer_tf.web"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Scripts, the model, the wasm and its fetches: this origin only ('wasm-unsafe-eval'
# compiles WebAssembly, nothing else). Images: a chosen file (blob:). Camera: mediastream.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' 'wasm-unsafe-eval'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob: mediastream:",
        "style-src 'self'",
        "worker-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)

Source = Union[str, bytes]  # a file to copy, or the bytes themselves


def find_mediapipe(given: Optional[str] = None) -> str:
    """The folder of the npm package @mediapipe/tasks-vision: `given`, or
    $CONVMIXER_MEDIAPIPE, or else the copy this installation carries, or node_modules/ of
    the repository or of the working folder; BadInput saying how to install it otherwise."""
    given = given or os.environ.get("CONVMIXER_MEDIAPIPE")
    package = os.path.join("node_modules", *MEDIAPIPE_PACKAGE.split("/"))
    candidates = [given] if given else [PACKAGED, os.path.join(REPOSITORY, package), package]
    for folder in candidates:
        if not missing(folder):
            return os.path.abspath(folder)
    where = given or " or ".join(candidates)
    raise BadInput(
        f"MediaPipe Tasks for Web not found in {where}: run `npm ci` in the repository "
        f"(or `npm install {MEDIAPIPE_PACKAGE}@{MEDIAPIPE_VERSION}`), or give --mediapipe FOLDER"
    )


def page_config(path: str) -> dict:
    """What the page shows of the .tflite file at `path` (or of `model.tflite` in the folder
    `path`), read from the facts it carries; BadInput for another kind of file, and for one
    that `export.model_file.open_model` refuses (damaged, not written by this project,
    facts that disagree with its graph, no classifier head)."""
    from convmixer_tf.export.model_file import open_model
    from convmixer_tf.export.registry import find

    path, _ = find(path, in_folder=MODEL)
    if not path.endswith(".tflite"):
        raise BadInput(f"{path} is not a .tflite file (the page runs the file a phone app ships)")
    facts = open_model(path, threads=1).facts
    config = facts.config
    name = facts.variant or f"ConvMixer-{config.dim}/{config.depth}"
    return {
        "written_by": WRITTEN_BY,
        "name": name,
        "classes": config.num_classes,
        "size": facts.preprocessing.input_size,
        "file": os.path.basename(path),
    }


@dataclasses.dataclass(frozen=True)
class Site:
    """Every file of the page: name served (relative, "/"-separated) -> `Source`."""

    files: Dict[str, Source]

    @classmethod
    def build(cls, model: str, mediapipe: Optional[str] = None) -> "Site":
        """The page for the .tflite file `model`, or the folder holding model.tflite (see
        `page_config`), with MediaPipe's files from `find_mediapipe(mediapipe)`."""
        from convmixer_tf.export.registry import find

        model, _ = find(os.fspath(model), in_folder=MODEL)
        config = page_config(model)
        mediapipe = find_mediapipe(mediapipe)
        files: Dict[str, Source] = {name: os.path.join(PAGE, name) for name in PAGE_FILES}
        files["index.html"] = _index_html()
        files[MODEL] = model
        files[CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
        for name in MEDIAPIPE_FILES:
            files[f"mediapipe/{name}"] = os.path.join(mediapipe, *name.split("/"))
        return cls(files)

    @property
    def config(self) -> dict:
        return json.loads(self.files[CONFIG])

    def open(self, name: str) -> BinaryIO:
        """The file served as `name`, open for reading (KeyError: not part of the page)."""
        source = self.files[name]
        return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def write(self, folder: str) -> None:
        """Writes every file under `folder` (which exists: a staging folder), each whole or
        not at all."""
        for name in self.files:
            path = os.path.join(folder, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, self.read(name))


@functools.lru_cache(maxsize=None)
def _index_html() -> bytes:
    """The page, with its Content Security Policy in a meta tag too: a static copy served by
    any server keeps it."""
    with open(os.path.join(PAGE, "index.html"), encoding="utf-8") as f:
        page = f.read()
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    return page.replace("<!--CSP-->", meta).encode()
