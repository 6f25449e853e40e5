"""What the network sees of an image file (convmixer_tf.images): one geometry, timm's, run
by PIL (`load_image`, no TensorFlow) and by TensorFlow (`eval_transform`, for tf.data);
hostile files (bombs, damaged and foreign bytes, special files, odd names) give an image or
BadInput within bounded memory; any bytes at all give one or the other."""

import ctypes
import functools
import importlib.util
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from convmixer_tf.config import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from convmixer_tf.decoding import MAX_HELD_BYTES, MAX_PIXELS
from convmixer_tf.errors import BadInput
from convmixer_tf.images import decoded, eval_transform, list_images, load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = Preprocessing(input_size=32, crop_pct=0.875)
# A hostile row's peak memory (RSS), the whole interpreter included (about 30 MB with numpy
# and PIL). The largest image the table decodes is the 8200 x 8200 JPEG at half size (17 MB
# grey, 67 MB as PIL's RGB); each bomb took gigabytes before (3.7 GB for 200000 x 1).
PEAK_MB = 256


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, *, depth: int = 8, rows=None) -> bytes:
    """A greyscale PNG written row by row (zlib streams it), so that a 20000 x 20000 one
    takes no memory to make; `rows` gives row y's bytes, zeros otherwise."""
    blank = bytes((width * depth + 7) // 8)
    packer = zlib.compressobj(9)
    parts = [packer.compress(b"\0" + (rows(y) if rows else blank)) for y in range(height)]
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    body = _chunk(b"IDAT", b"".join(parts) + packer.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + body + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def _thin_png(height: int) -> bytes:
    """A grey PNG one pixel wide: its rows of two bytes compress to almost nothing (130 KB
    for 67,108,864 of them), and PIL holds a pointer for each."""
    header = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    body = _chunk(b"IDAT", zlib.compress(b"\0\x80" * height, 9))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + body + _chunk(b"IEND", b"")


def _sof_lie(width: int, height: int) -> bytes:
    """A 16 x 16 JPEG whose frame header (SOF0) claims `width` x `height`: libjpeg reads the
    few blocks there are, meets the end, and fills the rest with grey, warning only."""
    from PIL import Image

    data = bytearray(_saved(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    at = data.index(b"\xff\xc0") + 5
    data[at : at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def _flat_jpeg(**options) -> bytes:
    """4096 x 4096 of one grey, Huffman tables optimised: 2 bits a block, the least any
    real JPEG holds."""
    from PIL import Image

    return _saved(Image.new("L", (4096, 4096), 0), "JPEG", optimize=True, **options)


def _photo(width=64, height=48, seed=0) -> np.ndarray:
    """A smooth random image (a photo's statistics more than noise's)."""
    walk = np.random.default_rng(seed).normal(0, 1, (height, width, 3)).cumsum(0).cumsum(1)
    return ((walk - walk.min()) / (np.ptp(walk) + 1e-9) * 255).astype(np.uint8)


def _saved(array_or_image, fmt: str, **options) -> bytes:
    from PIL import Image

    image = array_or_image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _frames():
    """Three frames of flat colours (a GIF keeps them exactly)."""
    frames = []
    for i in range(3):
        frame = np.zeros((40, 50, 3), np.uint8)
        frame[:] = (40 * i, 100, 200 - 50 * i)
        frame[5 + 5 * i : 20 + 5 * i, 10:30] = (255, 255, 0)
        frames.append(frame)
    return frames


def _animation(fmt: str, **options) -> bytes:
    from PIL import Image

    first, *rest = (Image.fromarray(f) for f in _frames())
    return _saved(first, fmt, save_all=True, append_images=rest, duration=100, **options)


def _cmyk() -> bytes:
    from PIL import Image

    return _saved(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG", quality=95)


def _palette_with_transparency() -> bytes:
    from PIL import Image

    image = Image.fromarray(_photo(20, 20)).convert("P", palette=Image.Palette.ADAPTIVE)
    return _saved(image, "PNG", transparency=0)


@functools.lru_cache(maxsize=None)
def _big_jpeg(progressive: bool = False) -> bytes:
    """8200 x 8200 grey (more than MAX_PIXELS): what a large camera's photo is to us."""
    side = 8200
    assert side * side > MAX_PIXELS
    ramp = np.broadcast_to(np.arange(side) * 255 // side, (side, side))
    return _saved(ramp.astype(np.uint8), "JPEG", quality=50, progressive=progressive)


def _file(data):
    return lambda folder: _write(folder / "image.png", data() if callable(data) else data)


def _write(path, data: bytes):
    with open(path, "wb") as out:
        out.write(data)
    return path


def _fifo(folder):
    os.mkfifo(folder / "x.jpg")
    return folder / "x.jpg"


def _unreadable(folder):
    path = _write(folder / "secret.png", _saved(_photo(), "PNG"))
    os.chmod(path, 0)
    return path


def _non_utf8(folder):
    path = os.path.join(os.fsencode(folder), b"caf\xe9 \xff.png")
    return _write(path, _saved(_photo(), "PNG"))


def _symlink(target):
    def make(folder):
        os.symlink(target(folder) if callable(target) else target, folder / "link.jpg")
        return folder / "link.jpg"

    return make


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + info


def _sparse(size: int):
    def make(folder):
        with open(folder / "big.png", "wb") as out:
            out.truncate(size)  # no disk used: a hole
        return folder / "big.png"

    return make


def _gif_frame_past_its_screen() -> bytes:
    """A 10 x 10 GIF whose one frame says 60000 x 60000."""
    from PIL import Image

    data = bytearray(_saved(Image.new("P", (10, 10)), "GIF"))
    at = data.index(b"\x2c") + 5  # the image descriptor's width and height
    data[at : at + 4] = struct.pack("<HH", 60000, 60000)
    return bytes(data)


def _row(name, make, expected, crop_pct=None):
    return pytest.param(make, crop_pct, expected, id=name)


IMAGE = "image"
LIMIT = rf"pixels: more than the {MAX_PIXELS} decoded at most$"
ROWS = (
    rf"^1 x 67108864 pixels: 805306368 bytes as PIL holds them \(4 a pixel, 8 a row\), "
    rf"more than the {MAX_HELD_BYTES} decoded at most$"
)
NOT_OURS = r"^not a JPEG, PNG, GIF, BMP or WebP image \(it starts with "
# how to make the file in a folder, what load_image gives (IMAGE, or a pattern of BadInput's
# message) and the crop_pct it runs with (SMALL's when None)
HOSTILE = [
    _row(
        "png 20000 x 20000", _file(lambda: _png(20000, 20000, depth=1)), "^20000 x 20000 " + LIMIT
    ),
    _row("png 200000 x 1", _file(lambda: _png(200000, 1, rows=lambda y: b"\xc8" * 200000)), IMAGE),
    _row("png 1000000 x 1", _file(lambda: _png(1000000, 1)), IMAGE),
    _row("png 1 x 1000000", _file(lambda: _png(1, 1000000)), IMAGE),
    # PIL holds 8 bytes a row beside 4 a pixel: at MAX_PIXELS, this one took 1.4 GB
    _row("png 1 x 67108864", _file(lambda: _thin_png(1 << 26)), ROWS),
    _row("png 1 x 4194304", _file(lambda: _thin_png(1 << 22)), IMAGE),
    _row("crop_pct 1e-6", _file(lambda: _saved(_photo(), "PNG")), IMAGE, crop_pct=1e-6),
    _row("animated gif", _file(lambda: _animation("GIF")), IMAGE),
    _row("animated webp", _file(lambda: _animation("WEBP", lossless=True)), IMAGE),
    _row(
        "truncated png",
        _file(lambda: _saved(_photo(), "PNG")[:3000]),
        "^truncated or damaged PNG file: ",
    ),
    _row(
        "truncated jpeg",
        _file(lambda: _saved(_photo(), "JPEG")[:600]),
        "^truncated or damaged JPEG file: ",
    ),
    _row("png header only", _file(lambda: _png(64, 64)[:33]), "^truncated or damaged PNG file: "),
    _row("zero bytes", _file(b""), NOT_OURS + r"b''\)$"),
    _row("random bytes", _file(lambda: np.random.default_rng(0).bytes(5000)), NOT_OURS),
    _row("html named .jpg", _file(b"<!DOCTYPE html><p>404</p>"), NOT_OURS + "b'<!DOCTYP'"),
    _row("bmp 30000 x 30000", _file(lambda: _bmp_header(30000, 30000)), "^30000 x 30000 " + LIMIT),
    _row("gif frame past its screen", _file(_gif_frame_past_its_screen), "^more than the 67108864"),
    _row("file of 513 MiB", _sparse(513 << 20), "^537919488 bytes: more than the 536870912 read"),
    _row("fifo", _fifo, "^not a regular file$"),
    _row("folder", lambda folder: folder, "^not a regular file$"),
    _row("device through a link", _symlink("/dev/zero"), "^not a regular file$"),
    _row(
        "link loop", _symlink(lambda folder: folder / "link.jpg"), "^cannot open: Too many levels"
    ),
    _row("missing", lambda folder: folder / "gone.png", "^cannot open: No such file or directory$"),
    _row("unreadable", _unreadable, "^cannot open: Permission denied$"),
    _row("non-utf-8 name", _non_utf8, IMAGE),
    _row("cmyk jpeg", _file(_cmyk), IMAGE),
    _row("16-bit png", _file(lambda: _png(40, 30, depth=16, rows=lambda y: b"\x80\0" * 40)), IMAGE),
    _row("palette png with transparency", _file(_palette_with_transparency), IMAGE),
    _row("1 x 1", _file(lambda: _saved(np.full((1, 1, 3), 7, np.uint8), "PNG")), IMAGE),
    _row("jpeg 8200 x 8200", _file(_big_jpeg), IMAGE),
    _row(
        "jpeg claiming 65500 x 65500 over 16 x 16",
        _file(lambda: _sof_lie(65500, 65500)),
        r"^truncated or damaged JPEG file: its \d+ bytes cannot hold the 67043344 blocks of "
        r"65500 x 65500 pixels \(a bit a block at least\)$",
    ),
    # a lie its bytes could hold is not told from a picture: small, and grey where data ends
    _row("jpeg claiming 64 x 64 over 16 x 16", _file(lambda: _sof_lie(64, 64)), IMAGE),
    _row("jpeg 4096 x 4096 of one grey", _file(_flat_jpeg), IMAGE),
    _row("progressive jpeg of one grey", _file(lambda: _flat_jpeg(progressive=True)), IMAGE),
    _row("progressive jpeg", _file(lambda: _big_jpeg(progressive=True)), "^8200 x 8200 " + LIMIT),
]
# The pixels some rows must give (raw RGB, the whole crop).
PIXELS = {
    "png 200000 x 1": (200, 200, 200),
    "png 1 x 4194304": (128, 128, 128),
    "jpeg 8200 x 8200": (127, 127, 127),  # the middle of a left-to-right ramp
    "cmyk jpeg": (255, 0, 255),  # no cyan, full magenta: PIL's naive conversion
    "16-bit png": (128, 128, 128),  # 0x8000 of 0xffff, not clipped to white
    "1 x 1": (7, 7, 7),
}

RUN = """
import json, sys
from convmixer_tf.config import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from convmixer_tf.errors import BadInput
from convmixer_tf.images import load_image
pre = Preprocessing(**json.loads(sys.argv[2]))
try:
    x = load_image(sys.argv[1], pre, normalize=False)
    out = {"shape": list(x.shape), "min": float(x.min()), "max": float(x.max()),
           "finite": bool(abs(x).max() < float("inf")), "mean": x.mean((0, 1)).tolist()}
except BadInput as err:
    out = {"error": str(err)}
# VmHWM: this process alone (ru_maxrss keeps the high-water mark of the process it forked from)
out["peak_mb"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
out["tensorflow"] = "tensorflow" in sys.modules or "keras" in sys.modules
print(json.dumps(out))
"""


def _without_root_override():
    """As root, permission bits deny nothing; a child without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (dropped from its bounding set before exec) meets them like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run(code: str, *args, timeout=120):
    """`code` in a fresh interpreter (this worktree's package), as an ordinary user would
    meet permissions: its last stdout line as JSON."""
    env = dict(os.environ, PYTHONPATH=REPO)
    preexec = _without_root_override if os.geteuid() == 0 else None
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            env=env,
            timeout=timeout,
            preexec_fn=preexec,
        )
    except subprocess.SubprocessError as err:  # prctl refused: no CAP_SETPCAP
        if not isinstance(err, subprocess.TimeoutExpired):
            pytest.skip(f"root here cannot give up its file permission override: {err}")
        raise
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json.loads(done.stdout.decode().splitlines()[-1])


@pytest.mark.parametrize("make,crop_pct,expected", HOSTILE)
def test_a_hostile_file_gives_an_image_or_bad_input_in_bounded_memory(
    request, tmp_path, make, crop_pct, expected
):
    name = request.node.callspec.id
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    options = {"input_size": SMALL.input_size, "crop_pct": crop_pct or SMALL.crop_pct}
    got = _run(RUN, os.fsencode(path), json.dumps(options))
    assert got["peak_mb"] < PEAK_MB, got
    assert not got["tensorflow"]
    if expected == IMAGE:
        assert "error" not in got, got
        assert (
            got["shape"] == [32, 32, 3] and got["finite"] and 0 <= got["min"] <= got["max"] <= 255
        )
        if name in PIXELS:
            np.testing.assert_allclose(got["mean"], PIXELS[name], atol=1.5)
    else:
        assert re.search(expected, got.get("error", "")), got


@pytest.mark.parametrize("budget, most", [(20_000, 1), (10**9, 2)])
def test_images_decoded_at_once_hold_no_more_than_one_at_the_limit(
    tmp_path, monkeypatch, budget, most
):
    """Two threads load images (predict's loaders): while what the images being decoded hold
    together would pass MAX_HELD_BYTES, a decode waits for the other (two at the limit took
    twice the memory of one); under it, both run."""
    import threading
    import time

    from convmixer_tf import decoding

    decode, inside, seen = decoding.rgb, [], []
    lock = threading.Lock()

    def watched(image):
        with lock:
            inside.append(image)
            seen.append(len(inside))
        time.sleep(0.05)
        with lock:
            inside.remove(image)
        return decode(image)

    monkeypatch.setattr(decoding, "MAX_HELD_BYTES", budget)  # a 64 x 48 image holds 12,672
    monkeypatch.setattr(decoding, "rgb", watched)
    paths = [_write(tmp_path / f"{i}.png", _saved(_photo(seed=i), "PNG")) for i in range(6)]
    threads = [
        threading.Thread(target=lambda part=paths[i::2]: [load_image(p, SMALL) for p in part])
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(seen) == most and len(seen) == 6


def test_an_animation_gives_its_first_frame_and_decodes_no_other(monkeypatch):
    from PIL import GifImagePlugin, WebPImagePlugin

    seeks, steps = [], []
    gif_seek, webp_next = GifImagePlugin.GifImageFile._seek, WebPImagePlugin.WebPImageFile._get_next
    monkeypatch.setattr(
        GifImagePlugin.GifImageFile,
        "_seek",
        lambda im, f, *a: seeks.append(f) or gif_seek(im, f, *a),
    )
    monkeypatch.setattr(
        WebPImagePlugin.WebPImageFile, "_get_next", lambda im: steps.append(1) or webp_next(im)
    )
    first = _frames()[0]
    for fmt, options in (("GIF", {}), ("WEBP", {"lossless": True})):
        alone = load_image(io.BytesIO(_saved(first, fmt, **options)), SMALL, normalize=False)
        animated = load_image(io.BytesIO(_animation(fmt, **options)), SMALL, normalize=False)
        np.testing.assert_array_equal(animated, alone)
        assert np.abs(animated - _array(first)).max() == 0
    assert seeks == [0, 0] and steps == [1, 1]


def _array(image: np.ndarray, pre: Preprocessing = SMALL) -> np.ndarray:
    return load_image(io.BytesIO(_saved(image, "PNG")), pre, normalize=False)


def test_a_large_jpeg_is_reduced_while_decoding_and_keeps_its_picture():
    x = load_image(
        io.BytesIO(_big_jpeg()), Preprocessing(input_size=64, crop_pct=1.0), normalize=False
    )
    # a left-to-right ramp, as the full-size image
    assert x[:, 0].mean() < 20 and x[:, -1].mean() > 235 and np.all(np.diff(x[32, :, 0]) >= -2)


def test_a_tiny_crop_pct_reads_the_same_pixels_as_a_small_one():
    """crop_pct 1e-6 resizes to a 32 x 10^8 image in timm's geometry; the crop is resized
    alone, and it is the middle of the image magnified (one source pixel, or the seam of
    two): the same colour everywhere."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :] = (10, 200, 90)
    x = _array(image, Preprocessing(input_size=32, crop_pct=1e-6))
    assert np.all(x == (10, 200, 90))


def test_a_crop_pct_too_small_for_a_float_is_bad_input():
    with pytest.raises(BadInput, match=r"crop_pct 1e-300 is too small"):
        Preprocessing(crop_pct=1e-300)


# ---------------------------------------------------------------------- the geometry


@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    size=st.integers(1, 64),
    crop_pct=st.floats(0.05, 1.0),
    interpolation=st.sampled_from(["bicubic", "bilinear"]),
)
@settings(max_examples=150, deadline=None)
def test_the_crop_alone_is_timm_s_resize_then_crop(width, height, size, crop_pct, interpolation):
    """PIL's box resize of the crop's window (the path for an image that timm would resize
    to more than MAX_PIXELS) against the whole resize then the crop (timm's steps), on smooth
    images: a few levels at most (PIL takes the box in float32, and chooses which of its two
    passes comes first by the sizes). Nearest and box filters are left out: there a sample
    on the border of two pixels may take either."""
    from PIL import Image

    from convmixer_tf import decoding, images

    pre = Preprocessing(input_size=size, crop_pct=crop_pct, interpolation=interpolation)
    crop = pre.eval_crop(width, height)
    assert min(crop.resized) == math.floor(size / crop_pct) and max(crop.resized) >= size
    left, top, right, bottom = crop.window()
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    image = Image.fromarray(_photo(width, height))
    whole = images._transformed(image, pre)
    old, decoding.MAX_PIXELS = decoding.MAX_PIXELS, 0
    try:
        alone = images._transformed(image, pre)
    finally:
        decoding.MAX_PIXELS = old
    assert np.abs(whole.astype(int) - alone).max() <= 3


# ---------------------------------------------------------------------- any bytes at all


def _headers():
    """Files that start as one of the formats (random sizes, random payloads)."""
    side = st.integers(0, 70000)
    short = st.integers(0, 65535)  # a GIF's and a JPEG's sides: 16 bits
    signed = st.integers(-70000, 70000)  # a BMP's negative height: rows top to bottom
    payload = st.binary(max_size=400)

    def png(w, h, depth, colour, body):
        header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
        data = _chunk(b"IDAT", zlib.compress(body)) + _chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + data

    def gif(w, h, flags, body):
        screen = struct.pack("<HHBBB", w, h, flags, 0, 0) + bytes(
            3 * 2 ** ((flags & 7) + 1) * (flags >> 7)
        )
        return (
            b"GIF89a"
            + screen
            + b"\x2c"
            + struct.pack("<HHHHB", 0, 0, w, h, 0)
            + b"\x08"
            + body
            + b"\x3b"
        )

    def bmp(w, h, bits, compression, body):
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bits, compression, 0, 0, 0, 0, 0)
        return b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54) + info + body

    def jpeg(w, h, components, body):
        frame = struct.pack(">BHHB", 8, h, w, components) + b"".join(
            bytes([i + 1, 0x11, 0]) for i in range(components)
        )
        return (
            b"\xff\xd8"
            + b"\xff\xc0"
            + struct.pack(">H", len(frame) + 2)
            + frame
            + body
            + b"\xff\xd9"
        )

    def webp(w, h, body):
        bits = ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
        chunk = (
            b"VP8L" + struct.pack("<I", len(body) + 5) + b"\x2f" + struct.pack("<I", bits) + body
        )
        return b"RIFF" + struct.pack("<I", len(chunk) + 4) + b"WEBP" + chunk

    return st.one_of(
        st.builds(png, side, side, st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([0, 2, 3, 4, 6]), payload),
        st.builds(gif, short, short, st.integers(0, 255), payload),
        st.builds(bmp, side, signed, st.sampled_from([1, 4, 8, 24, 32]), st.integers(0, 3), payload),
        st.builds(jpeg, short, short, st.sampled_from([1, 3, 4]), payload),
        st.builds(webp, st.integers(1, 16384), st.integers(1, 16384), payload),
    )  # fmt: skip


SAVED_MODES = {
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"],
    "GIF": ["RGB", "L", "P"],
    "BMP": ["RGB", "RGBA", "L", "P", "1"],
    "JPEG": ["RGB", "L", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
}


def _damaged():
    """Real files of each format and mode, small, with a few bytes changed and maybe cut."""

    def make(fmt, mode, width, height, changes, keep):
        from PIL import Image

        image = Image.fromarray(_photo(width, height, seed=width * height)).convert(mode)
        data = bytearray(_saved(image, fmt))
        for where, xor in changes:
            data[int(where * (len(data) - 1))] ^= xor
        return bytes(data[: max(1, int(keep * len(data)))])

    return st.sampled_from(sorted(SAVED_MODES)).flatmap(
        lambda fmt: st.builds(
            make,
            st.just(fmt),
            st.sampled_from(SAVED_MODES[fmt]),
            st.integers(1, 64),
            st.integers(1, 64),
            st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
            st.one_of(st.just(1.0), st.floats(0, 1)),
        )
    )


def _image_or_bad_input(data: bytes):
    try:
        x = load_image(io.BytesIO(data), SMALL, normalize=False)
    except BadInput as err:
        assert str(err) and "\n" not in str(err)
        event(re.sub(r"[:(].*", "", str(err)))
        return
    event("an image")
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255


@given(st.one_of(st.binary(max_size=2000), _headers(), _damaged()))
@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_give_an_image_or_bad_input(data):
    _image_or_bad_input(data)


@pytest.mark.slow
@given(st.one_of(st.binary(max_size=20000), _headers(), _damaged()))
@settings(max_examples=5000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_give_an_image_or_bad_input_many_more(data):
    _image_or_bad_input(data)


# ---------------------------------------------------------------------- folders


def test_a_folder_lists_regular_image_files_only_any_name(tmp_path):
    _write(tmp_path / "a.png", _saved(_photo(), "PNG"))
    _non_utf8(tmp_path)
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "sub.jpg").mkdir()
    _write(tmp_path / "sub.jpg" / "b.JPG", _saved(_photo(), "JPEG"))
    os.symlink("/dev/zero", tmp_path / "zero.png")
    found = list_images(tmp_path)
    names = [os.path.relpath(p, tmp_path) for p in found]
    assert names == ["a.png", os.fsdecode(b"caf\xe9 \xff.png"), os.path.join("sub.jpg", "b.JPG")]
    for path in found:
        assert load_image(path, SMALL).shape == (32, 32, 3)


def test_a_folder_nested_past_python_s_recursion_limit_is_listed(tmp_path, nested):
    """os.walk recursed once a level (RecursionError, exit 3, at 1,500 levels)."""
    deepest = nested(1500)
    images = [os.path.join(deepest, "x.png"), os.path.join(os.path.dirname(deepest), "y.png")]
    for path in images:
        _write(path, _saved(_photo(), "PNG"))
    assert list_images(tmp_path / "deep") == sorted(images)


def test_a_training_class_nested_past_python_s_recursion_limit_is_read(tmp_path, nested):
    from convmixer_tf.data import open_dataset

    deepest = nested(1500)
    root = str(tmp_path / "deep")
    os.mkdir(os.path.join(root, "b"))
    _write(os.path.join(deepest, "x.png"), _saved(_photo(), "PNG"))
    _write(os.path.join(root, "b", "y.png"), _saved(_photo(), "PNG"))
    source = open_dataset(data_dir=root, val_fraction=0.0)
    assert source.class_names == ["a", "b"] and source.train_size == 2


LIST = """
import json, sys
from convmixer_tf.errors import BadInput
from convmixer_tf.images import list_images
try:
    print(json.dumps({"found": list_images(sys.argv[1])}))
except BadInput as err:
    print(json.dumps({"error": str(err)}))
"""


def test_an_unreadable_folder_is_named_not_skipped(tmp_path):
    top = tmp_path / "photos"
    (top / "locked").mkdir(parents=True)
    _write(top / "a.png", _saved(_photo(), "PNG"))
    _write(top / "locked" / "b.png", _saved(_photo(), "PNG"))
    os.chmod(top / "locked", 0)
    try:
        got = _run(LIST, str(top))
        assert got == {"error": f"cannot list {top / 'locked'}: Permission denied"}
        os.chmod(top, 0)
        got = _run(LIST, str(top))
        assert got == {"error": f"cannot list {top}: Permission denied"}
    finally:
        os.chmod(top, 0o755)
        os.chmod(top / "locked", 0o755)


# ---------------------------------------------------------------------- TensorFlow's side


def test_tensorflow_s_decoder_is_checked_first_and_says_why(tmp_path):
    with pytest.raises(BadInput, match=r"^20000 x 20000 pixels"):
        decoded(_write(tmp_path / "bomb.png", _png(20000, 20000, depth=1)))
    with pytest.raises(BadInput, match=r"^not a JPEG"):
        decoded(_write(tmp_path / "page.jpg", b"<html></html>"))
    with pytest.raises(BadInput, match=r"(?i)png"):
        decoded(_write(tmp_path / "cut.png", _saved(_photo(), "PNG")[:3000]))
    with pytest.raises(BadInput, match=r"^not a regular file$"):
        decoded(tmp_path)
    image = decoded(_non_utf8(tmp_path))
    assert tuple(image.shape) == (48, 64, 3)


def test_a_training_folder_with_a_name_that_is_not_utf8_decodes(tmp_path):
    from convmixer_tf.data import open_dataset

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(3):
            name = f"{i}-\udcff.png" if c == 0 and i == 0 else f"{i}.png"
            _write(os.path.join(tmp_path, f"class{c}", name), _saved(_photo(seed=i), "PNG"))
    source = open_dataset(data_dir=str(tmp_path), val_fraction=0.0)
    assert source.train_size == 6 and not source.skipped
    assert len(list(source.train)) == 6


TF_RUN = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
from convmixer_tf.config import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from convmixer_tf.images import eval_transform
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
wide, tall = np.full((1, 200000, 3), 90, np.uint8), np.full((1000000, 1, 3), 90, np.uint8)
small = Preprocessing(input_size=32, crop_pct=0.875)
cases = [(wide, small), (tall, small), (np.full((48, 64, 3), 90, np.uint8), small.replace(crop_pct=1e-6))]
eval_transform(tf.constant(cases[2][0]), small)  # TensorFlow's own start-up, outside the figure
before, means = rss_mb(), []
for image, pre in cases:
    means.append(float(eval_transform(tf.constant(image), pre, normalize=False).numpy().mean()))
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
print(json.dumps({"means": means, "grown_mb": peak - before}))
"""


@pytest.mark.slow  # a fresh interpreter importing TensorFlow: 10-15 s here
def test_tensorflow_s_transform_resizes_the_crop_alone():
    """In TensorFlow, timm's geometry resizes a 200000 x 1 image to 6.6 million x 33 for a
    32 px crop (3.7 GB as float32 before), a 1 x 1000000 one to 33 x 33 million and a
    64 x 48 one at crop_pct 1e-6 to 32 million x 24 million; only the window around each
    crop is cast and resampled."""
    got = _run(TF_RUN, timeout=300)
    assert got["means"] == [90.0, 90.0, 90.0]
    assert got["grown_mb"] < 100, got


def test_tensorflow_s_transform_runs_the_same_geometry_in_a_pipeline():
    """eval_transform in a tf.data map (graph mode), on long thin images and a tiny crop_pct,
    against PIL's executor on the same pixels."""
    import tensorflow as tf

    long = np.tile(_photo(2000, 1), (1, 100, 1))
    for pre in (SMALL, SMALL.replace(crop_pct=1e-6), SMALL.replace(interpolation="nearest")):
        for image in (long, long.transpose(1, 0, 2)):
            pipeline = tf.data.Dataset.from_tensors(image).map(
                lambda x, pre=pre: eval_transform(x, pre, normalize=False)
            )
            x = next(iter(pipeline)).numpy()
            y = load_image(io.BytesIO(_saved(image, "PNG")), pre, normalize=False)
            assert x.shape == (32, 32, 3) and np.abs(x - y).max() <= 3, pre


# ---------------------------------------------------------------------- against timm

TIMM = """
import json, sys
import numpy as np
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
released = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg("convmixer_768_32").to_dict())
jobs, out = json.load(open(sys.argv[1])), {}
for i, (changes, path) in enumerate(jobs):
    config = dict(released, **changes)
    with open(path, "rb") as file:
        image = Image.open(file).convert("RGB")
        out[str(i)] = create_transform(**config)(image).permute(1, 2, 0).numpy()
np.savez(sys.argv[2], **out)
keys = ("input_size", "crop_pct", "interpolation", "mean", "std")
print(json.dumps({key: released[key] for key in keys}))
"""
# timm's interpolation names for ours ("area" is PIL's box filter).
TIMM_NAMES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "box"}


def _timm(jobs, folder):
    """timm's eval transform, in a process of its own (torch beside TensorFlow can crash), of
    each (config changes, image path) in `jobs`: (its outputs, the released config)."""
    if importlib.util.find_spec("timm") is None:  # not imported here: torch beside TensorFlow
        pytest.skip("timm is not installed")
    with open(folder / "jobs.json", "w") as out:
        json.dump(jobs, out)
    command = [sys.executable, "-c", TIMM, str(folder / "jobs.json"), str(folder / "timm.npz")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = np.load(folder / "timm.npz")
    return [outputs[str(i)] for i in range(len(jobs))], json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-learn's two sample photos (640 x 427, CC BY 2.0, shipped in its wheel), and
    odd shapes cut from one: portrait, landscape, tiny, 1 x 1."""
    from PIL import Image

    sklearn = pytest.importorskip("sklearn.datasets")
    folder = os.path.join(os.path.dirname(sklearn.__file__), "images")
    paths = [os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg")]
    out = tmp_path_factory.mktemp("photos")
    china = Image.open(paths[0]).convert("RGB")
    for name, box in {
        "portrait": (100, 0, 260, 427),
        "landscape": (0, 100, 640, 180),
        "tiny": (300, 200, 307, 205),
        "one": (5, 5, 6, 6),
    }.items():
        paths.append(str(out / f"{name}.png"))
        china.crop(box).save(paths[-1])
    return paths


@pytest.mark.torch
def test_both_executors_against_timm_s_own_transform(photos, tmp_path):
    """timm's create_transform with convmixer_768_32's pretrained cfg (224 px, crop_pct 0.96,
    bicubic) and two others (160 px, 0.875, bilinear; 96 px, 1.0, nearest), on real photos
    and odd shapes. PIL's executor is timm's transform: the same to float rounding.
    TensorFlow's, given the same decoded pixels, resamples in float32 without PIL's 8-bit
    rounding between its two passes (a few levels on a few pixels), and for nearest may take
    the other pixel, or both, where a sample falls on the border of two. Its own JPEG
    decoder differs again (recorded only)."""
    from PIL import Image

    others = [
        {},
        {"input_size": (3, 160, 160), "crop_pct": 0.875, "interpolation": "bilinear"},
        {"input_size": (3, 96, 96), "crop_pct": 1.0, "interpolation": "nearest"},
    ]
    jobs = [(changes, path) for changes in others for path in photos]
    expected, released = _timm(jobs, tmp_path)
    worst = {}
    for (changes, path), timm in zip(jobs, expected):
        config = dict(released, **changes)
        pre = Preprocessing(
            input_size=config["input_size"][1],
            crop_pct=config["crop_pct"],
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
        )
        by_pil = load_image(path, pre)
        by_tf = eval_transform(np.asarray(Image.open(path).convert("RGB")), pre).numpy()
        decoded_by_tf = eval_transform(decoded(path), pre).numpy()
        levels = np.abs(pre.denormalize(by_tf) - pre.denormalize(timm))
        decoders = np.abs(pre.denormalize(decoded_by_tf) - pre.denormalize(timm))
        name = f"{config['interpolation']} {os.path.basename(path)}"
        worst[name] = (np.abs(by_pil - timm).max(), levels.max(), decoders.max())
        assert np.abs(by_pil - timm).max() <= 1e-5, (config, path)
        if config["interpolation"] == "nearest":
            assert np.mean(levels > 0.5) <= 0.03, (config, path)
        else:
            assert levels.max() <= 10 and np.mean(levels > 1.5) <= 0.002, (config, path)
    print("largest difference (PIL normalised; TensorFlow in levels, and after its decoder):")
    print("\n".join(f"{name}: {a:.2g} {b:.3g} {c:.3g}" for name, (a, b, c) in worst.items()))


@pytest.mark.torch
def test_pil_s_executor_is_timm_s_transform_at_any_size(tmp_path):
    """Random image sizes, input sizes, crop_pct and filters: torchvision's truncations and
    rounding (its Resize and CenterCrop) are Preprocessing.eval_crop's, pixel for pixel."""
    rng = np.random.default_rng(0)
    jobs, cases = [], []
    for i in range(150):
        width, height = (int(v) for v in rng.integers(1, 120, 2))
        size, crop_pct = int(rng.integers(1, 64)), float(rng.uniform(0.05, 1.0))
        interpolation = str(rng.choice(list(TIMM_NAMES)))
        path = _write(tmp_path / f"{i}.png", _saved(_photo(width, height, seed=i), "PNG"))
        changes = {"input_size": (3, size, size), "crop_pct": crop_pct}
        jobs.append((dict(changes, interpolation=TIMM_NAMES[interpolation]), str(path)))
        cases.append(Preprocessing(input_size=size, crop_pct=crop_pct, interpolation=interpolation))
    expected, _ = _timm(jobs, tmp_path)
    for (_, path), pre, timm in zip(jobs, cases, expected):
        pre = pre.replace(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        assert np.abs(load_image(path, pre) - timm).max() <= 1e-5, (pre, path)
