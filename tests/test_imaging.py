"""decode_and_resize: img2dataset's resize semantics on Pillow, and every way an image is refused."""

from __future__ import annotations

import io
import os
from functools import cache

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before img2dataset imports albumentations

from img2dataset.resizer import Resizer  # noqa: E402

from curate.demo.pool import bomb_png  # noqa: E402
from curate.stages.download.imaging import ImageRejected, ResizeSpec, decode_and_resize, target_size  # noqa: E402

MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
SIZES = [(300, 200), (200, 300), (640, 480), (100, 100), (97, 251), (129, 128), (1000, 30), (33, 17)]


def encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


@cache
def gradient_jpeg(width: int, height: int) -> bytes:
    """A smooth RGB gradient: resampling differences between OpenCV and Pillow stay small on it."""
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    arr = np.stack([x, y, np.full((height, width), 128.0)], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(arr, "RGB"), quality=95)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def rejected(raw: bytes, **spec) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_and_resize(raw, ResizeSpec(**spec))
    return info.value.reason


@pytest.mark.parametrize("only_if_bigger", [False, True], ids=["always", "only_if_bigger"])
@pytest.mark.parametrize("image_size", [64, 128, 256])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_sizes_match_img2dataset(mode: str, size: tuple[int, int], image_size: int, only_if_bigger: bool) -> None:
    raw = gradient_jpeg(*size)
    ref, width, height, original_width, original_height, err = Resizer(image_size, mode, only_if_bigger)(
        io.BytesIO(raw))
    assert err is None
    out = decode_and_resize(raw, ResizeSpec(image_size=image_size, resize_mode=mode,
                                            resize_only_if_bigger=only_if_bigger))
    assert (out.width, out.height) == (width, height)
    assert (out.original_width, out.original_height) == (original_width, original_height) == size
    assert Image.open(io.BytesIO(out.data)).size == (out.width, out.height)
    if (not only_if_bigger or max(size) > image_size) and min(width, height) >= 16:
        # same crop offsets, same white border, same scaling: the pictures agree, not just the sizes
        assert np.abs(pixels(out.data) - pixels(ref)).mean() < 3


@pytest.mark.parametrize(
    ("mode", "size", "image_size", "only_if_bigger", "expected"),
    [
        ("no", (300, 200), 64, False, (300, 200)),
        ("keep_ratio", (300, 200), 100, False, (150, 100)),
        ("keep_ratio", (200, 300), 65, False, (65, 98)),
        ("center_crop", (640, 480), 128, False, (171, 128)),  # before the crop
        ("keep_ratio_largest", (640, 480), 128, False, (128, 96)),
        ("border", (97, 251), 128, False, (49, 128)),  # before the border
        ("keep_ratio", (100, 100), 256, True, (100, 100)),
        ("keep_ratio", (100, 100), 256, False, (256, 256)),
        ("keep_ratio_largest", (1000, 3), 64, False, (64, 1)),  # never a zero side
    ],
)
def test_target_size(mode: str, size: tuple[int, int], image_size: int, only_if_bigger: bool,
                     expected: tuple[int, int]) -> None:
    spec = ResizeSpec(image_size=image_size, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    assert target_size(*size, spec) == expected


@pytest.mark.parametrize("source", ["RGBA", "LA", "P"])
def test_transparency_composites_on_white(source: str) -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black
    img.paste((200, 30, 30, 255), (32, 0, 64, 64))  # right half opaque red
    if source == "LA":
        img = img.convert("LA")
    options = {}
    if source == "P":  # palette image: index 0 black (transparent), index 1 red
        img = Image.new("P", (64, 64), 0)
        img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
        img.paste(1, (32, 0, 64, 64))
        options = {"transparency": 0}
    raw = encode(img, "PNG", **options)
    assert source != "P" or "transparency" in Image.open(io.BytesIO(raw)).info
    out = decode_and_resize(raw, ResizeSpec(resize_mode="no", output_format="png"))
    result = pixels(out.data)
    assert np.abs(result[32, 8] - 255).max() <= 1, result[32, 8]
    if source != "LA":
        assert np.abs(result[32, 56] - (200, 30, 30)).max() <= 2, result[32, 56]
    ref = Resizer(64, "no", False, encode_format="png", encode_quality=3)(io.BytesIO(raw))[0]
    if source == "RGBA":
        assert np.abs(pixels(ref) - result).max() <= 1  # img2dataset mattes on white too


def test_border_is_white() -> None:
    out = decode_and_resize(gradient_jpeg(300, 100), ResizeSpec(image_size=120, resize_mode="border",
                                                                 output_format="png"))
    result = pixels(out.data)
    assert (out.width, out.height) == (120, 120)
    assert result[:35].min() >= 250 and result[-35:].min() >= 250  # 120x40 picture centred in white
    assert result[50:70].min() < 100


def test_truncated_jpeg() -> None:
    rng = np.random.default_rng(0)
    raw = encode(Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), "RGB"), quality=90)
    assert rejected(raw[: len(raw) // 2]) == "decode:truncated"


@pytest.mark.parametrize("raw", [b"<!doctype html><html>Not found</html>", b"", b"\x00" * 100])
def test_not_an_image(raw: bytes) -> None:
    assert rejected(raw) == "decode:not_an_image"


def test_unsupported_format() -> None:
    assert rejected(encode(Image.new("RGB", (40, 40)), "PPM")) == "decode:unsupported_format"


def test_bomb_refused_before_decoding() -> None:
    raw = bomb_png(20000)
    assert len(raw) < 1_000_000
    assert rejected(raw) == "decode:too_many_pixels"
    assert rejected(raw, max_image_pixels=20000 * 20000 - 1) == "decode:too_many_pixels"
    assert rejected(gradient_jpeg(100, 100), max_image_pixels=9_999) == "decode:too_many_pixels"


def test_min_image_size() -> None:
    raw = gradient_jpeg(24, 40)
    assert rejected(raw, min_image_size=32) == "resize:too_small"
    assert decode_and_resize(raw, ResizeSpec(min_image_size=24, image_size=32)).original_width == 24


def test_max_aspect_ratio() -> None:
    raw = gradient_jpeg(1000, 30)
    assert rejected(raw, max_aspect_ratio=6) == "resize:aspect_ratio"
    assert rejected(gradient_jpeg(30, 1000), max_aspect_ratio=6) == "resize:aspect_ratio"
    assert decode_and_resize(gradient_jpeg(180, 30), ResizeSpec(max_aspect_ratio=6)).width == 256


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(output_format: str, pil_format: str) -> None:
    out = decode_and_resize(gradient_jpeg(300, 200), ResizeSpec(image_size=64, output_format=output_format))
    assert out.ext == output_format
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.format == pil_format and img.size == (64, 64) and img.mode == "RGB"


@pytest.mark.parametrize(("fmt", "source_format"), [("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp")])
def test_source_formats(fmt: str, source_format: str) -> None:
    out = decode_and_resize(encode(Image.open(io.BytesIO(gradient_jpeg(80, 60))), fmt), ResizeSpec(image_size=40))
    assert out.source_format == source_format and (out.width, out.height) == (40, 40)


def test_large_jpeg_is_decoded_in_draft_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4000x3000 JPEG shrunk to 128 px decodes at 1/8 scale, and the result still matches img2dataset."""
    scales: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # records what Pillow chose; behaviour unchanged
        result = original(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    raw = gradient_jpeg(4000, 3000)
    out = decode_and_resize(raw, ResizeSpec(image_size=128, resize_mode="keep_ratio"))
    assert scales == [(500, 375)]
    assert (out.width, out.height, out.original_width, out.original_height) == (171, 128, 4000, 3000)
    ref, width, height, *_ = Resizer(128, "keep_ratio", False)(io.BytesIO(raw))
    assert (width, height) == (171, 128)
    assert np.abs(pixels(out.data) - pixels(ref)).mean() < 3

    scales.clear()
    decode_and_resize(raw, ResizeSpec(resize_mode="no"))  # nothing to shrink: full decode
    assert scales == []
