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

from curate.stages.download.budget import Budget, OverBudget
from curate.stages.download.decode_cost import Source, decode_cost, jpeg_coefficient_bytes, transparent

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
class Plan:
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


def plan_for(width: int, height: int, spec: ResizeSpec) -> Plan:
    scaled = target_size(width, height, spec)
    # img2dataset crops or pads only images it resized (resize_only_if_bigger leaves small ones untouched)
    resized = scaled != (width, height) or not spec.resize_only_if_bigger
    side = spec.image_size
    if spec.resize_mode == "center_crop" and resized:
        crop_w, crop_h = min(scaled[0], side), min(scaled[1], side)
        return Plan(scaled, ((scaled[0] - crop_w) // 2, (scaled[1] - crop_h) // 2, crop_w, crop_h), None)
    if spec.resize_mode == "border" and resized and (scaled[0] < side or scaled[1] < side):
        return Plan(scaled, None, (max(scaled[0], side), max(scaled[1], side)))
    return Plan(scaled, None, None)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (pasting through the alpha channel: one RGB copy, not the
    three an RGBA alpha_composite needs, which matters for a 64-megapixel PNG). _flatten_copies counts its copies."""
    if transparent(img):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


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
            _hold(stack, budget, decode_cost(Source(canvas, "RGBA", "WEBP", True), len(raw), _check(*canvas, spec)))
        img = _open(raw)
        if img.format not in DECODABLE:
            raise ImageRejected("decode:unsupported_format")
        width, height = img.size
        if canvas is not None and img.size != canvas:
            raise ImageRejected("decode:bad_header")
        plan = _check(width, height, spec)
        try:
            coefficient_bytes = jpeg_coefficient_bytes(img, raw)
            if img.format in ("JPEG", "MPO") and plan.scaled != (width, height):
                img.draft("RGB", plan.scaled)  # decode at 1/2, 1/4 or 1/8 scale when that still covers the target
            cost = decode_cost(Source.of(img, coefficient_bytes), len(raw), plan)
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


def _check(width: int, height: int, spec: ResizeSpec) -> Plan:
    """The plan for an image of this size, or ImageRejected: every size check, before anything is allocated."""
    if width <= 0 or height <= 0:
        raise ImageRejected("decode:bad_header")
    if width * height > spec.max_image_pixels:
        raise ImageRejected("decode:too_many_pixels")
    if min(width, height) < spec.min_image_size:
        raise ImageRejected("resize:too_small")
    if max(width, height) / min(width, height) > spec.max_aspect_ratio:
        raise ImageRejected("resize:aspect_ratio")
    plan = plan_for(width, height, spec)
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


def _resize(flat: Image.Image, plan: Plan, spec: ResizeSpec, downscale: bool) -> Image.Image:
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
