"""Try a .tflite file in a browser: a page that runs it, the very file a phone app ships,
through MediaPipe Tasks for Web's ImageClassifier (the C++ task graph of Android and iOS,
built to WebAssembly), on the CPU of the device that opens it.

A `Site` is every file of the page, by the name it is served under: the page itself
(`page/`), `model.tflite` (the file given, whatever its name, read through the file
opened when it was checked: `Checked`), `config.json` (what the page shows of the model:
its facts, read from the file) and MediaPipe's files (from the npm package
`@mediapipe/tasks-vision`: the copy a wheel carries, or node_modules/ of the repository
after `npm ci`; see `bundle`). `serving.server` serves those names and nothing
else, from the page's own origin, under a Content Security Policy that lets no request
leave it; `Site.write` writes them as a static folder. `python -m convmixer_tf.web` is
the command line. Importing this loads no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import json
import os
import stat
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


@dataclasses.dataclass(frozen=True)
class Checked:
    """A file opened once, when the command checked it, and read through that open file
    from then on: a file or a FIFO put at its path later is never opened (the page's
    config describes this file), and the file itself changed in place since (its size or
    modification time, as `cp` over it leaves them) is refused (OSError)."""

    path: str
    fd: int
    status: os.stat_result

    @classmethod
    def open(cls, path: str) -> "Checked":
        fd = _opened(path)
        return cls(path, fd, os.fstat(fd))

    def same_as(self, status: os.stat_result) -> bool:
        """Whether `status` (an os.stat of its path, or of the open file) is still this file,
        unchanged."""
        return _identity(status) == _identity(self.status)

    def reader(self) -> BinaryIO:
        if not self.same_as(os.fstat(self.fd)):
            raise OSError(errno.ESTALE, "changed since the command checked it", self.path)
        return io.BufferedReader(_Reader(self.fd))


Source = Union[str, bytes, Checked]  # a file to copy, the bytes themselves, a checked file


def _identity(status: os.stat_result) -> tuple:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _opened(path: str) -> int:
    """A descriptor of the regular file at `path`; OSError for anything else. O_NONBLOCK:
    a FIFO at that path does not block the open, and fstat then refuses it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


class _Reader(io.RawIOBase):
    """The bytes of the open file `fd`, at a position of its own (os.pread): the readers of
    one file, one a request, never move each other."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        start = {os.SEEK_SET: 0, os.SEEK_CUR: self._at}.get(whence)
        self._at = (os.fstat(self._fd).st_size if start is None else start) + offset
        return self._at

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, len(buffer), self._at)
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)


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
    model = open_model(path, threads=1)
    model.check_runs()  # the page runs it in the browser, where a failure says little
    facts = model.facts
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
        checked = Checked.open(model)
        config = page_config(model)
        if not checked.same_as(os.stat(model)):
            raise BadInput(f"{model} changed while it was checked; run the command again")
        mediapipe = find_mediapipe(mediapipe)
        files: Dict[str, Source] = {name: os.path.join(PAGE, name) for name in PAGE_FILES}
        files["index.html"] = _index_html()
        files[MODEL] = checked
        files[CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
        for name in MEDIAPIPE_FILES:
            files[f"mediapipe/{name}"] = os.path.join(mediapipe, *name.split("/"))
        return cls(files)

    @property
    def config(self) -> dict:
        return json.loads(self.files[CONFIG])

    def open(self, name: str) -> BinaryIO:
        """The file served as `name`, open for reading (KeyError: not part of the page;
        OSError: no longer a regular file, or a checked file changed since)."""
        source = self.files[name]
        if isinstance(source, bytes):
            return io.BytesIO(source)
        if isinstance(source, Checked):
            return source.reader()
        return os.fdopen(_opened(source), "rb")

    def write(self, folder: str) -> None:
        """Writes every file under `folder` (which exists: a staging folder), each whole or
        not at all."""
        for name in self.files:
            path = os.path.join(folder, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with self.open(name) as f:
                write_atomic(path, f.read())


@functools.lru_cache(maxsize=None)
def _index_html() -> bytes:
    """The page, with its Content Security Policy in a meta tag too: a static copy served by
    any server keeps it."""
    with open(os.path.join(PAGE, "index.html"), encoding="utf-8") as f:
        page = f.read()
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    return page.replace("<!--CSP-->", meta).encode()
