"""Fuzzing decode_and_resize with hypothesis: small valid PNG, JPEG, GIF, WebP, TIFF and BMP files made with Pillow,
then bit flips, byte insertions and deletions, truncations and header dimensions rewritten to huge values (PNG chunk
CRCs fixed so the header is believed). Every case must return a DecodedImage or raise ImageRejected, never anything
else, and its resident memory peak must stay within what it held from a small decode budget (plus the file's size,
which Pillow may read before the budget is asked).

Deterministic (derandomize) so the suite is stable; CURATE_FUZZ_EXAMPLES=50000 runs a longer search, and
pytest's --hypothesis-show-statistics counts the cases.
"""

from __future__ import annotations

import ctypes
import io
import os
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from curate.stages.download.budget import Budget
from curate.stages.download.imaging import DecodedImage, ImageRejected, ResizeSpec, decode_and_resize, limit_heap_growth

MiB = 2**20
BUDGET = 32 * MiB
SLACK = 4 * MiB  # Python objects and codec state the fuzz loop itself leaves behind between measurements
_LIBC = ctypes.CDLL("libc.so.6")
limit_heap_growth()
EXAMPLES = int(os.environ.get("CURATE_FUZZ_EXAMPLES", "1500"))  # per CI run; ~100k random-seed cases found no more


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


@cache
def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    rgb = Image.fromarray(rng.integers(0, 256, (18, 26, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (18, 26, 4), dtype=np.uint8), "RGBA")
    palette = rgb.quantize(16)
    frames = [palette, Image.fromarray(rng.integers(0, 256, (18, 26, 3), dtype=np.uint8), "RGB").quantize(16)]
    return {
        "png-rgb": _encode(rgb, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-la": _encode(rgba.convert("LA"), "PNG"),
        "png-p-trns": _encode(palette, "PNG", transparency=0),
        "png-1": _encode(rgb.convert("1"), "PNG"),
        "png-i16": _encode(Image.fromarray(rng.integers(0, 65535, (18, 26), dtype=np.uint16)), "PNG"),
        "apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], disposal=1, blend=1),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-progressive": _encode(rgb, "JPEG", quality=80, progressive=True),
        "jpeg-gray": _encode(rgb.convert("L"), "JPEG"),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif": _encode(palette, "GIF"),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=2,
                                transparency=0),
        "webp": _encode(rgb, "WEBP", quality=70),
        "webp-lossless": _encode(rgba, "WEBP", lossless=True),
        "webp-animated": _encode(rgba, "WEBP", save_all=True, append_images=[rgba.rotate(90)]),
        "tiff": _encode(rgb, "TIFF"),
        "tiff-lzw-rgba": _encode(rgba, "TIFF", compression="tiff_lzw"),
        "tiff-jpeg": _encode(rgb, "TIFF", compression="jpeg"),
        "tiff-cmyk": _encode(rgb.convert("CMYK"), "TIFF", compression="tiff_adobe_deflate"),
        "bmp": _encode(rgb, "BMP"),
        "bmp-p": _encode(palette, "BMP"),
    }


def _png_fix_crcs(raw: bytes) -> bytes:
    """Recompute every chunk's CRC, so a mutated chunk is read rather than refused for its checksum."""
    out, pos = bytearray(raw[:8]), 8
    while pos + 8 <= len(raw):
        length = struct.unpack_from(">I", raw, pos)[0]
        end = pos + 8 + length
        if end + 4 > len(raw):
            out += raw[pos:]
            break
        out += raw[pos:end] + struct.pack(">I", zlib.crc32(raw[pos + 4:end]))
        pos = end + 4
    return bytes(out)


def _set_dimensions(raw: bytes, width: int, height: int) -> bytes:
    """Rewrite the header's image size where each format keeps it (the first frame's, for GIF)."""
    try:
        return _rewrite_dimensions(raw, width, height)
    except (struct.error, IndexError):
        return raw  # an earlier mutation cut the header short


def _rewrite_dimensions(raw: bytes, width: int, height: int) -> bytes:
    data = bytearray(raw)
    if raw.startswith(b"\x89PNG"):
        struct.pack_into(">II", data, 16, width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        return _png_fix_crcs(bytes(data))
    if raw.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = raw.find(marker)
            if at >= 0:
                struct.pack_into(">HH", data, at + 5, height & 0xFFFF, width & 0xFFFF)
                break
    elif raw.startswith(b"GIF"):
        struct.pack_into("<HH", data, 6, width & 0xFFFF, height & 0xFFFF)
        at = raw.find(b"\x2c", 13)
        if at >= 0 and at + 9 <= len(raw):
            struct.pack_into("<HH", data, at + 5, width & 0xFFFF, height & 0xFFFF)
    elif raw.startswith(b"RIFF") and raw[12:16] == b"VP8X":
        data[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif raw.startswith(b"RIFF") and raw[12:16] == b"VP8L":
        flags = struct.unpack_from("<I", raw, 21)[0] & 0xF0000000  # alpha hint and version
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | flags
        struct.pack_into("<I", data, 21, bits)
    elif raw.startswith(b"RIFF") and raw[12:16] == b"VP8 ":
        struct.pack_into("<HH", data, 26, width & 0x3FFF, height & 0x3FFF)
    elif raw.startswith(b"BM"):
        struct.pack_into("<ii", data, 18, width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif raw[:4] == b"II*\0":
        offset = struct.unpack_from("<I", raw, 4)[0]
        for i in range(struct.unpack_from("<H", raw, offset)[0]):
            entry = offset + 2 + 12 * i
            tag, kind = struct.unpack_from("<HH", raw, entry)
            if tag in (256, 257):
                value = (width if tag == 256 else height) & (0xFFFFFFFF if kind == 4 else 0xFFFF)
                struct.pack_into("<I" if kind == 4 else "<H", data, entry + 8, value)
    return bytes(data)


@cache
def _warm_up_once() -> None:
    """Load every plugin and codec once, so their one-time allocations do not land inside a measured case."""
    Image.init()
    for raw in seeds().values():
        decode_and_resize(raw, ResizeSpec(), Budget(BUDGET))


SIDES = st.one_of(st.sampled_from([0, 1, 2, 7, 255, 256, 4095, 16383, 16384, 40000, 65535, 65536, 2**24, 2**31 - 1,
                                   2**32 - 1]), st.integers(0, 70000))


@st.composite
def hostile_files(draw) -> bytes:
    name = draw(st.sampled_from(sorted(seeds())))
    raw = bytearray(seeds()[name])
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite", "dimensions"]))
        if not raw:
            break
        # mostly past the first 8 bytes: a broken signature only tests the format check, again and again
        at = min(draw(st.one_of(st.integers(8, 8 + len(raw)), st.integers(0, len(raw)))), len(raw) - 1)
        if kind == "flip":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del raw[at:]
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=16))
            raw[at:at + len(patch)] = patch
        else:
            raw = bytearray(_set_dimensions(bytes(raw), draw(SIDES), draw(SIDES)))
    if raw.startswith(b"\x89PNG") and draw(st.booleans()):
        raw = bytearray(_png_fix_crcs(bytes(raw)))
    return bytes(raw)


SPECS = st.builds(
    ResizeSpec,
    image_size=st.sampled_from([1, 16, 64, 256]),
    resize_mode=st.sampled_from(["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]),
    resize_only_if_bigger=st.booleans(),
    output_format=st.sampled_from(["jpg", "png", "webp"]),
    max_image_pixels=st.sampled_from([89_478_485, 4_000_000]),
)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=hostile_files(), spec=SPECS)
# found by earlier runs: a BigTIFF header pointing its directory past any offset struct can read (OverflowError in
# the directory check), and a 2×65,535 image for JPEG output (libjpeg stops at 65,500: resize:error after decoding)
@example(raw=b"II+\0" + struct.pack("<HHQ", 8, 0, 2**63) + bytes(16), spec=ResizeSpec(resize_mode="no"))
@example(raw=_encode(Image.new("RGB", (2, 65535)), "TIFF"), spec=ResizeSpec(resize_mode="no"))
def test_decode_of_mutated_files_is_an_image_or_a_reason_within_its_budget(raw: bytes, spec: ResizeSpec) -> None:
    _warm_up_once()
    budget = Budget(BUDGET)
    _LIBC.malloc_trim(0)  # freed heap goes back first, so pages the decode reuses count (gc.collect: too slow here)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    try:
        result = decode_and_resize(raw, spec, budget)
    except ImageRejected as err:
        result = err
    peak = _status("VmHWM") - base
    assert peak <= budget.peak + len(raw) + SLACK, (peak / MiB, budget.peak / MiB, len(raw))
    assert budget.held == 0
    if isinstance(result, DecodedImage):
        with Image.open(io.BytesIO(result.data)) as stored:
            assert stored.size == (result.width, result.height)

