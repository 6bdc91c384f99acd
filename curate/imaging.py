"""Decode, resize and re-encode one image with img2dataset's resize semantics, on Pillow.

Pillow rather than img2dataset's OpenCV Resizer: Pillow reads the pixel count from the header before decoding (so a
decompression bomb is refused without allocating it), decodes JPEGs at reduced scale (draft mode), reports truncated
files as errors instead of grey-filling them, and releases the GIL so a thread pool decodes in parallel.
Output sizes match ``img2dataset.resizer.Resizer`` for every resize mode (tested).

Every file is hostile: only the allowed formats' parsers ever see it, the result's size is checked before anything is
resized (a 160-byte 1×40,000 PNG asks keep_ratio for a 256×10,240,000 image), and the decode holds, from the worker's
budget, what it will allocate at its peak, counted by mode, format and step (measured: tests/test_imaging_hostile.py).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

from PIL import Image, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from curate.budget import Budget, OverBudget

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]
OutputFormat = Literal["jpg", "png", "webp"]

# Formats we are willing to decode; everything else is refused as decode:unsupported_format, and Image.open is told
# to try only these, so no other plugin's parser ever reads a downloaded file.
DECODABLE = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpeg"}
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # MPO files open through the JPEG plugin

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # OpenCV's INTER_AREA averages source pixels per output pixel, as BOX does
    "lanczos": Image.Resampling.LANCZOS,
}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_MAX_SIDE = {"jpg": 65_500, "png": 2**31 - 1, "webp": 16_383}  # the encoders refuse longer sides (libjpeg: 65,500)

# Pillow inflates PNG text chunks while opening, before any size check, keeping up to 64 MiB of them per image; we
# store no metadata, so a file whose text inflates past 4 MiB is refused instead (decode:bad_header).
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 4 * 2**20)
_TIFF_MAX_VALUES = 65_536  # per numeric tag: Pillow unpacks each value into a Python object, a tile per strip offset


@dataclass(frozen=True)
class ResizeSpec:
    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    output_format: OutputFormat = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    max_image_pixels: int = 89_478_485  # Pillow's default bomb limit; bounds the resized image too


@dataclass(frozen=True)
class DecodedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    source_format: str


class ImageRejected(Exception):
    """A per-row outcome, not an error of the job: ``reason`` is the ledger reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def target_size(width: int, height: int, spec: ResizeSpec) -> tuple[int, int]:
    """The size after resizing, before any crop or border (img2dataset: SmallestMaxSize / LongestMaxSize)."""
    if spec.resize_mode == "no":
        return width, height
    if spec.resize_mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    else:
        side = max(width, height)
    if spec.resize_only_if_bigger and side <= spec.image_size:
        return width, height
    scale = spec.image_size / side
    # albumentations rounds each side to the nearest pixel, keeping the constrained side exact
    if side == width:
        return spec.image_size, max(1, round(height * scale))
    return max(1, round(width * scale)), spec.image_size


@dataclass(frozen=True)
class _Plan:
    """The geometry of one image: scaled to ``scaled`` (target_size); for center_crop only the ``crop`` (left, top,
    width, height, in scaled coordinates) is ever resampled; border pads the result onto a ``canvas``."""

    scaled: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    canvas: tuple[int, int] | None

    @property
    def resampled(self) -> tuple[int, int]:
        return self.crop[2:] if self.crop else self.scaled

    @property
    def final(self) -> tuple[int, int]:
        return self.canvas or self.resampled


def _plan(width: int, height: int, spec: ResizeSpec) -> _Plan:
    scaled = target_size(width, height, spec)
    # img2dataset crops or pads only images it resized (resize_only_if_bigger leaves small ones untouched)
    resized = scaled != (width, height) or not spec.resize_only_if_bigger
    side = spec.image_size
    if spec.resize_mode == "center_crop" and resized:
        crop_w, crop_h = min(scaled[0], side), min(scaled[1], side)
        return _Plan(scaled, ((scaled[0] - crop_w) // 2, (scaled[1] - crop_h) // 2, crop_w, crop_h), None)
    if spec.resize_mode == "border" and resized and (scaled[0] < side or scaled[1] < side):
        return _Plan(scaled, None, (max(scaled[0], side), max(scaled[1], side)))
    return _Plan(scaled, None, None)


# Bytes per pixel Pillow stores for each mode (RGB is padded to 4, as RGBA); modes not listed take 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA")
_DIRECT_TO_RGB = {"1", "L", "P", "I", "I;16", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}


def _transparent(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (pasting through the alpha channel: one RGB copy, not the
    three an RGBA alpha_composite needs, which matters for a 64-megapixel PNG). _flatten_copies counts its copies."""
    if _transparent(img):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _flatten_copies(mode: str, transparent: bool) -> int:
    """Bytes per decoded pixel that _flatten allocates at its peak, besides the decoded image."""
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
class _Source:
    """What decode_cost needs to know of a file: the size and mode it decodes to, its format, and the bytes its
    decoder buffers besides the image (JPEG's coefficients, libtiff's strip)."""

    size: tuple[int, int]
    mode: str
    format: str
    transparent: bool
    decoder_bytes: int = 0
    bmp_rle: bool = False

    @classmethod
    def of(cls, img: Image.Image, coefficient_bytes: int) -> _Source:
        """Of an opened and drafted image (JPEG's coefficients are counted before drafting: it does not shrink them)."""
        rle = img.format == "BMP" and bool(img.tile) and img.tile[0][0] == "bmp_rle"
        return cls(img.size, img.mode, img.format or "", _transparent(img),
                   coefficient_bytes + _tiff_strip_bytes(img), rle)


def decode_cost(source: _Source, raw_size: int, plan: _Plan) -> int:
    """Bytes a decode allocates at its peak, an upper bound.

    The peak of four steps, each counting what is alive then: loading (the decoded image in its mode and the decoder's
    buffers), _flatten's copies, the resize (its first pass, then the result) and the output (crop or canvas, the
    encoded file). The source image lives throughout."""
    decoded_w, decoded_h = source.size
    decoded = decoded_w * decoded_h
    lasting = decoded * (_STORED_BYTES.get(source.mode, 4) + _LASTING_BYTES.get(source.format, 0))
    lasting += raw_size if source.format in _KEEPS_FILE_COPY else 0
    load = decoded * _DECODING_BYTES.get("BMP_RLE" if source.bmp_rle else source.format, 0) + source.decoder_bytes
    flatten = decoded * _flatten_copies(source.mode, source.transparent)
    flat = 0 if source.mode == "RGB" else 4 * decoded
    out_w, out_h = plan.resampled
    resampled = 4 * out_w * out_h if plan.scaled != source.size or plan.crop else 0
    first_pass = 4 * max(out_w * decoded_h, decoded_w * out_h) if plan.scaled != source.size else 0
    final_w, final_h = plan.final
    output = (4 * final_w * final_h if plan.canvas else 0) + _ENCODED_BYTES * final_w * final_h
    peak = lasting + max(load, flatten, flat + first_pass + resampled, flat + resampled + output)
    return int(peak * _MARGIN) + _FIXED_BYTES


def _webp_canvas(raw: bytes) -> tuple[int, int] | None:
    """The canvas size in a WebP header, read where Pillow's WebP plugin reads it (None if it is not there)."""
    chunk = raw[12:16]
    if chunk == b"VP8 " and len(raw) >= 30 and raw[23:26] == b"\x9d\x01\x2a":
        return struct.unpack_from("<H", raw, 26)[0] & 0x3FFF, struct.unpack_from("<H", raw, 28)[0] & 0x3FFF
    if chunk == b"VP8X" and len(raw) >= 30:
        return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
    if chunk == b"VP8L" and len(raw) >= 25 and raw[20] == 0x2F:
        bits = struct.unpack_from("<I", raw, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


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


def _jpeg_coefficient_bytes(img: Image.Image, raw: bytes) -> int:
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


def _gif_without_first_disposal(raw: bytes) -> bytes:
    """The GIF with the disposal method of its first frame cleared. Pillow fills a frame-sized disposal canvas while
    opening (before any size check of ours: 80 MB for a 43-byte file); it only matters for the frame after the first,
    which we never decode. Walks the blocks before the first image as Pillow's GIF parser does."""
    if len(raw) < 13:
        return raw
    pos = 13 + (3 << ((raw[10] & 7) + 1) if raw[10] & 0x80 else 0)
    patched = None
    while pos < len(raw):
        block, pos = raw[pos], pos + 1
        if block in (0x2C, 0x3B):  # the first image, or the end
            break
        if block != 0x21 or pos >= len(raw):
            continue  # Pillow skips unknown bytes one at a time
        label, pos = raw[pos], pos + 1
        if label == 0xF9 and pos + 1 < len(raw) and raw[pos] and raw[pos + 1] & 0x1C:
            patched = patched or bytearray(raw)
            patched[pos + 1] &= ~0x1C & 0xFF
        while pos < len(raw) and raw[pos]:  # the extension's sub-blocks
            pos += raw[pos] + 1
        pos += 1
    return bytes(patched) if patched else raw


def _tiff_value_counts(raw: bytes) -> list[int]:
    """The value counts of the numeric tags of a TIFF's first directory (classic or BigTIFF); [] if unreadable.
    Reads the header as Pillow's TIFF plugin does (byte order from the first two bytes, BigTIFF from the third)."""
    order, big = ("<" if raw[:2] == b"II" else ">"), raw[2] == 43
    try:
        offset = struct.unpack_from(order + ("Q" if big else "I"), raw, 8 if big else 4)[0]
        if offset >= len(raw):
            return []
        entries = struct.unpack_from(order + ("Q" if big else "H"), raw, offset)[0]
        first, size = offset + (8 if big else 2), (20 if big else 12)
        counts = []
        for i in range(min(entries, (len(raw) - first) // size)):
            kind, count = struct.unpack_from(order + ("HQ" if big else "HI"), raw, first + i * size + 2)
            if kind not in (1, 2, 7):  # bytes, text and undefined stay bytes; everything else becomes objects
                counts.append(count)
        return counts
    except struct.error:
        return []


def _open(raw: bytes) -> Image.Image:
    """Identify ``raw`` with the allowed plugins only, or raise ImageRejected."""
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        raw = _gif_without_first_disposal(raw)
    elif raw[:4] in TiffImagePlugin.PREFIXES:
        if max(_tiff_value_counts(raw), default=0) > _TIFF_MAX_VALUES:
            raise ImageRejected("decode:bad_header")
    try:
        return Image.open(io.BytesIO(raw), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own guard (2× Image.MAX_IMAGE_PIXELS) fired first
        raise ImageRejected("decode:too_many_pixels") from None
    except UnidentifiedImageError:
        reason = "decode:unsupported_format" if _other_format_signature(raw[:16]) else "decode:not_an_image"
        raise ImageRejected(reason) from None
    except Exception:  # Pillow raises many types on malformed headers
        raise ImageRejected("decode:bad_header") from None


def _other_format_signature(prefix: bytes) -> bool:
    """Whether a format we do not decode claims these first bytes: only its signature check runs, never its parser."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name in DECODABLE or accept is None:
            continue
        try:
            if accept(prefix):  # True, or a message that its codec is not installed
                return True
        except Exception:  # a signature check reading past a short prefix
            continue
    return False


def limit_heap_growth() -> None:
    """Make glibc return large freed blocks to the system at once.

    Its default raises the mmap threshold after every large free, so later image-sized buffers come from per-thread
    heaps that never shrink: with 64 threads decoding large images a worker grew to 15 GB while holding under 1 GB.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: buffers over 1 MiB are mmapped and unmapped when freed
        libc.mallopt(-8, 4)  # M_ARENA_MAX: fewer per-thread heaps
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def decode_and_resize(raw: bytes, spec: ResizeSpec, budget: Budget | None = None) -> DecodedImage:
    """Decode ``raw`` and produce the stored image, or raise ImageRejected with a ledger reason.

    With a ``budget``, the decode holds decode_cost (its peak allocation) until the re-encoded result exists, so
    concurrent decodes in one worker share a memory bound; a decode that needs more than the whole budget is refused
    (decode:over_budget) rather than run."""
    with ExitStack() as stack:
        return _decode_and_resize(raw, spec, budget, stack)


def _decode_and_resize(raw: bytes, spec: ResizeSpec, budget: Budget | None, stack: ExitStack) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        canvas = None
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            # libwebp allocates both its canvases while Pillow opens the file: check and hold them before that
            canvas = _webp_canvas(raw)
            if canvas is None:
                raise ImageRejected("decode:bad_header")
            _hold(stack, budget, decode_cost(_Source(canvas, "RGBA", "WEBP", True), len(raw), _check(*canvas, spec)))
        img = _open(raw)
        if img.format not in DECODABLE:
            raise ImageRejected("decode:unsupported_format")
        width, height = img.size
        if canvas is not None and img.size != canvas:
            raise ImageRejected("decode:bad_header")
        plan = _check(width, height, spec)
        try:
            coefficient_bytes = _jpeg_coefficient_bytes(img, raw)
            if img.format in ("JPEG", "MPO") and plan.scaled != (width, height):
                img.draft("RGB", plan.scaled)  # decode at 1/2, 1/4 or 1/8 scale when that still covers the target
            cost = decode_cost(_Source.of(img, coefficient_bytes), len(raw), plan)
        except Exception:  # a header Pillow accepted but that does not add up
            raise ImageRejected("decode:bad_header") from None
        if canvas is None:
            _hold(stack, budget, cost)
        try:
            img.load()
        except OSError as err:
            text = str(err).lower()
            reason = "decode:truncated" if "truncat" in text or "broken data stream" in text else "decode:error"
            raise ImageRejected(reason) from None
        except Exception:
            raise ImageRejected("decode:error") from None
        try:
            out = _resize(_flatten(img), plan, spec, downscale=math.prod(plan.scaled) < width * height)
            buffer = io.BytesIO()
            if spec.output_format == "png":
                out.save(buffer, "PNG", compress_level=min(spec.encode_quality, 9))
            else:
                out.save(buffer, _PIL_FORMAT[spec.output_format], quality=spec.encode_quality)
        except Exception:
            raise ImageRejected("resize:error") from None
    return DecodedImage(buffer.getvalue(), spec.output_format, out.width, out.height, width, height,
                        DECODABLE[img.format])


def _check(width: int, height: int, spec: ResizeSpec) -> _Plan:
    """The plan for an image of this size, or ImageRejected: every size check, before anything is allocated."""
    if width <= 0 or height <= 0:
        raise ImageRejected("decode:bad_header")
    if width * height > spec.max_image_pixels:
        raise ImageRejected("decode:too_many_pixels")
    if min(width, height) < spec.min_image_size:
        raise ImageRejected("resize:too_small")
    if max(width, height) / min(width, height) > spec.max_aspect_ratio:
        raise ImageRejected("resize:aspect_ratio")
    plan = _plan(width, height, spec)
    if max(math.prod(plan.resampled), math.prod(plan.final)) > spec.max_image_pixels:
        raise ImageRejected("resize:too_many_pixels")  # e.g. keep_ratio scaling a 1×40,000 strip to 256 wide
    if max(plan.final) > _MAX_SIDE[spec.output_format]:
        raise ImageRejected("resize:too_large_for_format")
    return plan


def _hold(stack: ExitStack, budget: Budget | None, cost: int) -> None:
    """Hold ``cost`` from the budget until the decode's end (refused when over the whole budget)."""
    if budget is not None:
        try:
            stack.enter_context(budget.hold(cost))
        except OverBudget:
            raise ImageRejected("decode:over_budget") from None


def _resize(flat: Image.Image, plan: _Plan, spec: ResizeSpec, downscale: bool) -> Image.Image:
    resample = _RESAMPLE[spec.downscale_interpolation if downscale else spec.upscale_interpolation]
    out = flat
    if plan.crop:
        left, top, crop_w, crop_h = plan.crop
        if plan.scaled == flat.size:
            out = flat.crop((left, top, left + crop_w, top + crop_h)) if (crop_w, crop_h) != flat.size else flat
        else:  # resample only the source region under the crop, never the whole scaled image
            scale_x, scale_y = flat.width / plan.scaled[0], flat.height / plan.scaled[1]
            box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
            out = flat.resize((crop_w, crop_h), resample, box=box)
    elif plan.scaled != flat.size:
        out = flat.resize(plan.scaled, resample)
    if plan.canvas:
        canvas = Image.new("RGB", plan.canvas, "white")
        canvas.paste(out, ((canvas.width - out.width) // 2, (canvas.height - out.height) // 2))
        out = canvas
    return out
