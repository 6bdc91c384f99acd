"""What decoding one image allocates at its peak, an upper bound counted by mode, format and step: the decode
holds this much of the worker's budget (curate.stages.download.budget) before it allocates anything.
Measured against tracemalloc and RSS in tests/test_imaging_hostile.py."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from curate.stages.download.imaging import Plan

# Bytes per pixel Pillow stores for each mode (RGB is padded to 4, as RGBA); modes not listed take 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
ALPHA_MODES = ("RGBA", "LA", "PA")
_DIRECT_TO_RGB = {"1", "L", "P", "I", "I;16", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}


def transparent(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def flatten_copies(mode: str, transparent: bool) -> int:
    """Bytes per decoded pixel that imaging._flatten allocates at its peak, besides the decoded image."""
    if mode == "RGB":
        return 0
    if transparent:  # an RGBA copy (unless it is one), the RGB canvas, the alpha band
        return (0 if mode == "RGBA" else 4) + 4 + 1
    return 4 if mode in _DIRECT_TO_RGB else 5  # Pillow converts F, I;16B, ... to RGB through L


# What a format's decoder holds besides the image, per decoded pixel: while decoding (libwebp's decoded frame,
# copied out of its canvas, and its alpha plane or lossless pixels; the bytearray and copy of Pillow's BMP RLE
# decoder) and for as long as the image lives (libwebp's two canvases). libtiff's strip is counted from the tags.
_DECODING_BYTES = {"WEBP": 8, "BMP_RLE": 2, "GIF": 1}
_LASTING_BYTES = {"WEBP": 8}
_KEEPS_FILE_COPY = {"WEBP"}  # Pillow's WebP decoder keeps its own copy of the whole file
_ENCODED_BYTES = 5  # per output pixel: JPEG at quality 100 of noise reaches 4.1, plus BytesIO's growth
_MARGIN = 1.1  # for allocator rounding and what the per-pixel counts above leave out
_FIXED_BYTES = 2 * 2**20  # codec tables, line buffers, Python objects


def _tiff_strip_bytes(img: Image.Image) -> int:
    """libtiff decodes one strip or tile at a time into a buffer of its uncompressed size (at least RGBA, which its
    YCbCr and old-JPEG path produces); Pillow's own raw decoder, for uncompressed files, needs none."""
    if img.format != "TIFF" or not img.tile or img.tile[0][0] != "libtiff":
        return 0
    width, height = img.size
    try:
        tags = img.tag_v2
        bits = tags.get(258, 8)
        pixel = max(math.ceil((sum(bits) if isinstance(bits, tuple) else int(bits)) / 8), 4)
        if 322 in tags and 323 in tags:
            return pixel * int(tags[322]) * int(tags[323])
        return pixel * width * min(int(tags.get(278, height)), height)
    except (TypeError, ValueError, KeyError):
        return 8 * width * height  # unreadable tags: the whole image at the most bytes a pixel Pillow accepts


@dataclass(frozen=True)
class Source:
    """What decode_cost needs to know of a file: the size and mode it decodes to, its format, and the bytes its
    decoder buffers besides the image (JPEG's coefficients, libtiff's strip)."""

    size: tuple[int, int]
    mode: str
    format: str
    transparent: bool
    decoder_bytes: int = 0
    bmp_rle: bool = False

    @classmethod
    def of(cls, img: Image.Image, coefficient_bytes: int) -> Source:
        """Of an opened and drafted image (JPEG's coefficients are counted before drafting: it does not shrink them)."""
        rle = img.format == "BMP" and bool(img.tile) and img.tile[0][0] == "bmp_rle"
        return cls(img.size, img.mode, img.format or "", transparent(img),
                   coefficient_bytes + _tiff_strip_bytes(img), rle)


def decode_cost(source: Source, raw_size: int, plan: Plan) -> int:
    """Bytes a decode allocates at its peak, an upper bound.

    The peak of four steps, each counting what is alive then: loading (the decoded image in its mode and the decoder's
    buffers), imaging's flatten copies, the resize (its first pass, then the result) and the output (crop or canvas, the
    encoded file). The source image lives throughout."""
    decoded_w, decoded_h = source.size
    decoded = decoded_w * decoded_h
    lasting = decoded * (_STORED_BYTES.get(source.mode, 4) + _LASTING_BYTES.get(source.format, 0))
    lasting += raw_size if source.format in _KEEPS_FILE_COPY else 0
    load = decoded * _DECODING_BYTES.get("BMP_RLE" if source.bmp_rle else source.format, 0) + source.decoder_bytes
    flatten = decoded * flatten_copies(source.mode, source.transparent)
    flat = 0 if source.mode == "RGB" else 4 * decoded
    out_w, out_h = plan.resampled
    resampled = 4 * out_w * out_h if plan.scaled != source.size or plan.crop else 0
    first_pass = 4 * max(out_w * decoded_h, decoded_w * out_h) if plan.scaled != source.size else 0
    final_w, final_h = plan.final
    output = (4 * final_w * final_h if plan.canvas else 0) + _ENCODED_BYTES * final_w * final_h
    peak = lasting + max(load, flatten, flat + first_pass + resampled, flat + resampled + output)
    return int(peak * _MARGIN) + _FIXED_BYTES


def _jpeg_first_scan_components(raw: bytes) -> int | None:
    """How many components the first scan of a JPEG carries (None when the markers cannot be walked)."""
    pos = 2
    while pos + 4 < len(raw):
        if raw[pos] != 0xFF:
            pos += 1  # junk between segments: libjpeg skips it too
            continue
        marker = raw[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, standalone markers
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:
            return raw[pos + 4]
        pos += 2 + struct.unpack_from(">H", raw, pos + 2)[0]
    return None


def jpeg_coefficient_bytes(img: Image.Image, raw: bytes) -> int:
    """libjpeg keeps every DCT coefficient of the full-size image (2 bytes each, 64 per 8×8 block of each component,
    at the component's sampling) when the file has more than one scan: progressive files, and sequential ones whose
    first scan leaves out a component. Draft mode does not shrink it."""
    layers = getattr(img, "layer", None) or []
    if img.format not in ("JPEG", "MPO") or not layers:
        return 0
    scanned = _jpeg_first_scan_components(raw)
    if not img.info.get("progressive") and scanned is not None and scanned >= len(layers):
        return 0
    width, height = img.size
    h_max, v_max = max(max(h for _, h, _, _ in layers), 1), max(max(v for _, _, v, _ in layers), 1)
    total = 0
    for _, h, v, _ in layers:
        h, v = max(h, 1), max(v, 1)
        blocks_w = math.ceil(math.ceil(width * h / h_max) / 8)
        blocks_h = math.ceil(math.ceil(height * v / v_max) / 8)
        total += math.ceil(blocks_w / h) * h * math.ceil(blocks_h / v) * v * 128
    return total
