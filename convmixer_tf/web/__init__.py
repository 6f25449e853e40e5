"""Try a .tflite file in a browser: a page that runs it, the very file a phone app ships,
through MediaPipe Tasks for Web's ImageClassifier (the C++ task graph of Android and iOS,
built to WebAssembly), on the CPU of the device that opens it.

A `Site` is every file of the page, by the name it is served under: the page itself
(`page/`), `model.tflite` (the file given, whatever its name), `config.json` (what the
page shows of the model: its facts, read from the file) and MediaPipe's files (from the
npm package `@mediapipe/tasks-vision`, which `npm ci` installs in the repository). `serve`
serves those names and nothing else, from the page's own origin, under a Content Security
Policy that lets no request leave it; `Site.write` writes them as a static folder.
`python -m convmixer_tf.web` is the command line. Importing this loads no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import mimetypes
import os
from typing import Dict, Optional, Union

from convmixer_tf.errors import BadInput
from convmixer_tf.outputs import write_atomic

MEDIAPIPE_PACKAGE = "@mediapipe/tasks-vision"
MEDIAPIPE_VERSION = "1.1.0"  # package.json and package-lock.json pin the same
MEDIAPIPE_FILES = (
    "vision_bundle.mjs",
    "wasm/vision_wasm_internal.js",
    "wasm/vision_wasm_internal.wasm",
    "wasm/vision_wasm_nosimd_internal.js",
    "wasm/vision_wasm_nosimd_internal.wasm",
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
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}

Source = Union[str, bytes]  # a file to copy, or the bytes themselves


def find_mediapipe(given: Optional[str] = None) -> str:
    """The folder of the npm package @mediapipe/tasks-vision: `given`, or
    $CONVMIXER_MEDIAPIPE, or node_modules/ of the repository or of the working folder;
    BadInput saying how to install it otherwise."""
    given = given or os.environ.get("CONVMIXER_MEDIAPIPE")
    package = os.path.join("node_modules", *MEDIAPIPE_PACKAGE.split("/"))
    candidates = [given] if given else [os.path.join(REPOSITORY, package), package]
    for folder in candidates:
        missing = [f for f in MEDIAPIPE_FILES if not os.path.isfile(os.path.join(folder, f))]
        if not missing:
            return os.path.abspath(folder)
    where = given or " or ".join(candidates)
    raise BadInput(
        f"MediaPipe Tasks for Web not found in {where}: run `npm ci` in the repository "
        f"(or `npm install {MEDIAPIPE_PACKAGE}@{MEDIAPIPE_VERSION}`), or give --mediapipe FOLDER"
    )


def page_config(path: str) -> dict:
    """What the page shows of the .tflite file at `path`, read from the facts it carries;
    BadInput for a file this project did not write (the page needs its metadata)."""
    from convmixer_tf.export.tflite import read_facts

    if not os.path.isfile(path):
        raise BadInput(f"model not found: {path}")
    if not path.endswith(".tflite"):
        raise BadInput(f"{path} is not a .tflite file (the page runs the file a phone app ships)")
    info = read_facts(path)
    if info is None:
        raise BadInput(
            f"{path} does not describe itself (no convmixer.json packed in it): give a .tflite "
            "file this version exported"
        )
    config = info.config
    name = info.variant or f"ConvMixer-{config.dim}/{config.depth}"
    return {
        "written_by": WRITTEN_BY,
        "name": name,
        "classes": config.num_classes,
        "size": info.preprocessing.input_size,
        "file": os.path.basename(path),
    }


@dataclasses.dataclass(frozen=True)
class Site:
    """Every file of the page: name served (relative, "/"-separated) -> `Source`."""

    files: Dict[str, Source]

    @classmethod
    def build(cls, model: str, mediapipe: Optional[str] = None) -> "Site":
        """The page for the .tflite file `model` (see `page_config`), with MediaPipe's files
        from `find_mediapipe(mediapipe)`."""
        model = os.fspath(model)
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

    def read(self, name: str) -> bytes:
        source = self.files[name]
        if isinstance(source, bytes):
            return source
        with open(source, "rb") as f:
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


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the site's names; 404 for anything else (no folder is ever listed
    or walked: a name either is in the site or is not)."""

    site: Site

    def version_string(self):
        return "convmixer-web"

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        name = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/") or "index.html"
        if name not in self.site.files:
            self.send_error(404, "not part of this page")
            return
        data = self.site.read(name)
        self.send_response(200)
        kind = TYPES.get(os.path.splitext(name)[1]) or mimetypes.guess_type(name)[0]
        self.send_header("Content-Type", kind or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # a request log would bury the address line


def server(site: Site, host: str = "127.0.0.1", port: int = 8000) -> http.server.HTTPServer:
    """An HTTP server of `site` (not yet serving: call serve_forever); port 0 picks a free
    port (`server_address` says which); BadInput when the address cannot be had."""
    handler = type("Handler", (_Handler,), {"site": site})
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise BadInput(
            f"cannot serve on {host}:{port}: {err.strerror or err}; pass another --port"
        ) from None
