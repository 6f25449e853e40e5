"""Reading one image file with PIL, within bounds: the format from its first bytes (no
other is tried), the size from its header before anything is decoded, and any failure
of PIL's as BadInput with a one-line reason. `images` builds on it (`load_image`, and
the check before TensorFlow's decoders)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading

import numpy as np

from convmixer_tf.errors import BadInput, one_line

# The most pixels decoded from one file (8192 x 8192), and the most of a resized image
# (timm's resize of a long thin image or a small crop_pct can be far larger; such an image's
# crop is resized alone). A larger JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's
# DCT scaling) when that fits; any other larger image is refused, from its header, before
# decoding.
MAX_PIXELS = 1 << 26
# PIL holds an image as rows: 4 bytes a pixel (RGB is stored as RGBX) and a pointer of 8
# bytes a row, so a long thin image holds far more than its pixels (1 x 67,108,864: 805 MB
# as RGB, 604 MB more as decoded grey). The most one image may hold (`held_bytes`), decoded
# or resized: what 8192 x 8192 pixels hold. It bounds the images decoded at once too
# (`holding`).
MAX_HELD_BYTES = 8192 * (8 + 4 * 8192)
# Past glibc's largest mmap threshold (32 MiB), so a freed block goes back to the system.
PIL_BLOCK_BYTES = 64 << 20
# The largest image file read: 8 bytes a pixel (16-bit RGBA, uncompressed) at MAX_PIXELS.
MAX_FILE_BYTES = 8 * MAX_PIXELS
# The formats read, by the bytes their files start with (what TensorFlow's decoders read).
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),  # GIF87a, GIF89a
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),  # RIFF....WEBP
)
FORMAT_NAMES = "a JPEG, PNG, GIF, BMP or WebP image"


def open_file(path):
    """`path` opened for reading, through its bytes (a name that is not UTF-8 opens too);
    BadInput for anything but a regular file. O_NONBLOCK: a FIFO put in its place after
    listing does not block the open, and fstat then refuses it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(os.fsencode(path), flags)
    except OSError as err:
        raise BadInput(f"cannot open: {err.strerror}") from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise BadInput("not a regular file")
    if status.st_size > MAX_FILE_BYTES:
        os.close(fd)
        raise BadInput(f"{status.st_size} bytes: more than the {MAX_FILE_BYTES} read at most")
    return os.fdopen(fd, "rb")


def _format_of(head: bytes) -> str:
    for signature, name in SIGNATURES:
        if head.startswith(signature) and (name != "WEBP" or head[8:12] == b"WEBP"):
            return name
    raise BadInput(f"not {FORMAT_NAMES} (it starts with {head[:8]!r})")


def _reader(name: str):
    """PIL's reader of format `name`, used directly: no other format is tried, and PIL's
    own decompression-bomb check gives way to MAX_PIXELS (which reduces JPEGs instead)."""
    from PIL import (
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        WebPImagePlugin,
    )

    # PIL's 16 MiB blocks stay in the heap of the thread that freed them (glibc's mmap
    # threshold rises to 32 MiB): predict's two loaders then kept two images at the limit
    # between them (710 MB for four, measured here). Larger blocks are mapped and unmapped
    # whole, whichever thread decodes (402 MB).
    Image.core.set_block_size(PIL_BLOCK_BYTES)
    readers = (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile)
    readers += (GifImagePlugin.GifImageFile, BmpImagePlugin.BmpImageFile)
    return {reader.format: reader for reader in readers + (WebPImagePlugin.WebPImageFile,)}[name]


def header(file, *, reduce: bool):
    """The image in binary `file`, its header read and nothing decoded; at most MAX_PIXELS
    (a larger JPEG set to decode reduced, with `reduce`); BadInput otherwise."""
    name = _format_of(file.read(16))
    file.seek(0)
    try:
        image = _reader(name)(file)
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on damaged bytes
        raise _damaged(name, err) from None
    width, height = image.size
    if name == "JPEG":
        _check_jpeg_data(file, width, height)
    # libjpeg reduces a baseline JPEG in one pass; a progressive one keeps every DCT
    # coefficient of the full size in memory however much it is reduced
    reducible = name == "JPEG" and not image.info.get("progressive")
    if not fits(width, height) and reduce and reducible:
        # libjpeg's DCT scaling: the smallest of 1/2, 1/4, 1/8 that fits
        factor = next((f for f in (2, 4, 8) if fits(-(-width // f), -(-height // f))), 8)
        image.draft(None, (max(1, width // factor), max(1, height // factor)))
    if image.size[0] * image.size[1] > MAX_PIXELS:
        raise BadInput(f"{width} x {height} pixels: more than the {MAX_PIXELS} decoded at most")
    held = held_bytes(*image.size)
    if held > MAX_HELD_BYTES:
        raise BadInput(
            f"{width} x {height} pixels: {held} bytes as PIL holds them (4 a pixel, 8 a row), "
            f"more than the {MAX_HELD_BYTES} decoded at most"
        )
    return image


def _check_jpeg_data(file, width: int, height: int) -> None:
    """BadInput when the JPEG in `file` is too short for the size its frame header gives.
    Huffman coding spends a bit at least on each 8 x 8 block of the first component (the
    shortest code, for a block like the one before it); libjpeg, meeting the end of the
    data early, fills the rest with grey and only warns, which PIL does not pass on."""
    at = file.tell()
    size = file.seek(0, os.SEEK_END)
    file.seek(at)
    blocks = -(-width // 8) * -(-height // 8)
    if size * 8 < blocks:
        raise BadInput(
            f"truncated or damaged JPEG file: its {size} bytes cannot hold the {blocks} blocks "
            f"of {width} x {height} pixels (a bit a block at least)"
        )


def held_bytes(width: int, height: int) -> int:
    """The memory PIL holds for a `width` x `height` image of 4 bytes a pixel (RGB, RGBA)."""
    return height * (8 + 4 * width)


def fits(width: int, height: int) -> bool:
    """Whether an image of that size may be decoded, or made by a resize."""
    return width * height <= MAX_PIXELS and held_bytes(width, height) <= MAX_HELD_BYTES


_held = {"bytes": 0}  # what the images decoded at once (`holding`) hold together
_released = threading.Condition()


@contextlib.contextmanager
def holding(image):
    """The block that decodes (and transforms) `image`, a `header`, waits until what the
    images in such blocks hold together, this one's `held_bytes` included, is at most
    MAX_HELD_BYTES; one alone always runs. Threads that load images at once (predict's
    loaders) so hold about one image at the limit between them, not one each."""
    size = held_bytes(*image.size)
    with _released:
        _released.wait_for(lambda: not _held["bytes"] or _held["bytes"] + size <= MAX_HELD_BYTES)
        _held["bytes"] += size
    try:
        yield
    finally:
        with _released:
            _held["bytes"] -= size
            _released.notify_all()


def _damaged(name: str, err: Exception) -> BadInput:
    """What PIL's `err` on a `name` file means, in one line."""
    from PIL import Image

    if isinstance(err, Image.DecompressionBombError):  # a size PIL checks itself: a GIF frame's
        return BadInput(f"more than the {MAX_PIXELS} pixels decoded at most: {one_line(err)}")
    return BadInput(f"truncated or damaged {name} file: {one_line(err)[:200]}")


def rgb(image):
    """The decoded first frame of `image` as an RGB PIL image; BadInput when it does not
    decode."""
    try:
        image.load()
        if image.mode.startswith("I;16"):
            # 16-bit grey: its top 8 bits, as TensorFlow's decoder gives (PIL's own
            # conversion clips at 255: a white image)
            from PIL import Image

            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on damaged bytes
        raise _damaged(image.format, err) from None
