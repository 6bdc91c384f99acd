"""Decode, resize and re-encode one image with img2dataset's resize semantics, on Pillow.

Pillow rather than img2dataset's OpenCV Resizer: Pillow reads the pixel count from the header before decoding (so a
decompression bomb is refused without allocating it), decodes JPEGs at reduced scale (draft mode), reports truncated
files as errors instead of grey-filling them, and releases the GIL so a thread pool decodes in parallel.
Output sizes match ``img2dataset.resizer.Resizer`` for every resize mode (tested).
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError

from curate.budget import Budget

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]
OutputFormat = Literal["jpg", "png", "webp"]

# Formats we are willing to decode; everything else is refused as decode:unsupported_format.
DECODABLE = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpeg"}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # OpenCV's INTER_AREA averages source pixels per output pixel, as BOX does
    "lanczos": Image.Resampling.LANCZOS,
}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


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
    max_image_pixels: int = 89_478_485  # Pillow's default bomb limit


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


def _flatten(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (pasting through the alpha channel: one RGB copy, not the
    three an RGBA alpha_composite needs, which matters for a 64-megapixel PNG)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


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

    With a ``budget``, the decode holds the image's decoded size in bytes (after draft reduction) until the
    re-encoded result exists, so concurrent decodes in one worker share a memory bound."""
    with ExitStack() as stack:
        return _decode_and_resize(raw, spec, budget, stack)


def _decode_and_resize(raw: bytes, spec: ResizeSpec, budget: Budget | None, stack: ExitStack) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:  # Pillow's own guard (2× Image.MAX_IMAGE_PIXELS) fired first
            raise ImageRejected("decode:too_many_pixels") from None
        except UnidentifiedImageError:
            raise ImageRejected("decode:not_an_image") from None
        except Exception:  # Pillow raises many types on malformed headers
            raise ImageRejected("decode:bad_header") from None
        if img.format not in DECODABLE:
            raise ImageRejected("decode:unsupported_format")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected("decode:bad_header")
        if width * height > spec.max_image_pixels:
            raise ImageRejected("decode:too_many_pixels")
        if min(width, height) < spec.min_image_size:
            raise ImageRejected("resize:too_small")
        if max(width, height) / min(width, height) > spec.max_aspect_ratio:
            raise ImageRejected("resize:aspect_ratio")
        new_w, new_h = target_size(width, height, spec)
        if img.format == "JPEG" and (new_w, new_h) != (width, height):
            img.draft("RGB", (new_w, new_h))  # decode at 1/2, 1/4 or 1/8 scale when that still covers the target
        if budget is not None:
            decoded_w, decoded_h = img.size  # after draft
            # the decoded image (up to 4 bytes a pixel), its RGB copy, and the resized result
            stack.enter_context(budget.hold(decoded_w * decoded_h * 7 + new_w * new_h * 3))
        try:
            img.load()
        except OSError as err:
            text = str(err).lower()
            reason = "decode:truncated" if "truncat" in text or "broken data stream" in text else "decode:error"
            raise ImageRejected(reason) from None
        except Exception:
            raise ImageRejected("decode:error") from None
        try:
            out = _flatten(img)
            resized = (new_w, new_h) != (width, height) or not spec.resize_only_if_bigger
            if (new_w, new_h) != out.size:
                downscale = new_w * new_h < width * height
                resample = _RESAMPLE[spec.downscale_interpolation if downscale else spec.upscale_interpolation]
                out = out.resize((new_w, new_h), resample)
            # img2dataset crops or pads only images it resized (resize_only_if_bigger leaves small ones untouched)
            if spec.resize_mode == "center_crop" and resized:
                left = (out.width - min(out.width, spec.image_size)) // 2
                top = (out.height - min(out.height, spec.image_size)) // 2
                out = out.crop((left, top, left + min(out.width, spec.image_size), top + min(out.height, spec.image_size)))
            elif spec.resize_mode == "border" and resized and (out.width < spec.image_size or out.height < spec.image_size):
                canvas = Image.new("RGB", (max(out.width, spec.image_size), max(out.height, spec.image_size)), "white")
                canvas.paste(out, ((canvas.width - out.width) // 2, (canvas.height - out.height) // 2))
                out = canvas
            buffer = io.BytesIO()
            if spec.output_format == "png":
                out.save(buffer, "PNG", compress_level=min(spec.encode_quality, 9))
            else:
                out.save(buffer, _PIL_FORMAT[spec.output_format], quality=spec.encode_quality)
        except Exception:
            raise ImageRejected("resize:error") from None
    return DecodedImage(buffer.getvalue(), spec.output_format, out.width, out.height, width, height, DECODABLE[img.format])
