"""decode_and_resize against hostile files: upscale bombs, the decode budget's count of what a decode allocates, files
in formats we do not decode, and small files that make Pillow allocate or loop while merely opening them.

Memory is measured as the process's resident high-water mark (Pillow and its codecs allocate outside Python's
allocator, where tracemalloc cannot see): freed heap is handed back first (malloc_trim) so reused pages count too,
then the kernel's mark is reset (/proc/self/clear_refs) and read back after the call.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import (
    DdsImagePlugin, IcoImagePlugin, ImImagePlugin, Image, ImtImagePlugin, IptcImagePlugin, PcdImagePlugin,
    PcxImagePlugin, PsdImagePlugin, SgiImagePlugin, SpiderImagePlugin, TgaImagePlugin, WebPImagePlugin,
)

import curate
from curate.stages.download.budget import Budget
from curate.demo.pool import bomb_png
from curate.stages.download.imaging import DecodedImage, ImageRejected, ResizeSpec, decode_and_resize, limit_heap_growth

MiB = 2**20
_LIBC = ctypes.CDLL("libc.so.6")
limit_heap_growth()  # as the download stage's workers run


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn):
    """(fn's result, or the exception it raised; the most resident memory the call added)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to what is resident now
    base = _status("VmRSS")
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - the caller asserts on it
        result = err
    return result, _status("VmHWM") - base


def outcome(result) -> tuple:
    if isinstance(result, DecodedImage):
        return ("ok", (result.width, result.height))
    if isinstance(result, ImageRejected):
        return ("rejected", result.reason)
    return ("raised", repr(result))


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


# A decode in a child process whose address space is capped, so a decode that tries to allocate gigabytes (today's
# upscale bomb) fails there with MemoryError instead of taking this shared machine's memory.
_CHILD = r"""
import ctypes, gc, json, resource, sys, time
from pathlib import Path
from curate.stages.download.imaging import DecodedImage, ImageRejected, ResizeSpec, decode_and_resize, limit_heap_growth
limit_heap_growth()
raw, spec, cap = Path(sys.argv[1]).read_bytes(), ResizeSpec(**json.loads(sys.argv[2])), int(sys.argv[3])
status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + cap, resource.RLIM_INFINITY))
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0); open("/proc/self/clear_refs", "w").write("5")
base, start = status("VmRSS"), time.monotonic()
try:
    out = decode_and_resize(raw, spec); result = ["ok", [out.width, out.height]]
except ImageRejected as err:
    result = ["rejected", err.reason]
except MemoryError:
    result = ["raised", "MemoryError"]
print(json.dumps({"outcome": result, "peak": status("VmHWM") - base, "seconds": time.monotonic() - start}))
"""


def decode_in_capped_child(tmp_path: Path, raw: bytes, cap: int = 1024 * MiB, **spec) -> dict:
    path = tmp_path / "input.bin"
    path.write_bytes(raw)
    env = {**os.environ, "PYTHONPATH": str(Path(curate.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(spec), str(cap)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    status, detail = report["outcome"]
    report["outcome"] = (status, tuple(detail) if isinstance(detail, list) else detail)  # as outcome() gives it
    return report


# --- finding 5: the size after resizing is checked before anything is resized ---------------------------------------

STRIP_EXPECTED = {  # what each resize mode makes of a 157-byte 1×40,000 PNG (and of its 40,000×1 twin, transposed)
    "no": ("ok", (1, 40000)),
    "keep_ratio": ("rejected", "resize:too_many_pixels"),  # would be 256×10,240,000: 9.8 GiB as RGB
    "keep_ratio_largest": ("ok", (1, 256)),
    "center_crop": ("ok", (256, 256)),  # only the crop is resampled, never the 256×10,240,000 image
    "border": ("ok", (256, 256)),
}


@pytest.mark.parametrize("tall", [True, False], ids=["1x40000", "40000x1"])
@pytest.mark.parametrize("mode", list(STRIP_EXPECTED))
def test_upscale_bomb_every_resize_mode(tmp_path: Path, mode: str, tall: bool) -> None:
    raw = bomb_png(1, 40000) if tall else bomb_png(40000, 1)
    assert len(raw) < 200
    report = decode_in_capped_child(tmp_path, raw, resize_mode=mode)
    status, detail = STRIP_EXPECTED[mode]
    if status == "ok" and not tall:
        detail = detail[::-1]
    assert report["outcome"] == (status, detail), report
    assert report["peak"] < 64 * MiB, report


def test_upscale_past_the_output_formats_limit_is_refused_before_resizing() -> None:
    raw = encode(Image.new("RGB", (1, 300), "red"), "PNG")  # keep_ratio: 256×76,800, JPEG stops at 65,500
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec(resize_mode="keep_ratio")))
    assert outcome(result) == ("rejected", "resize:too_large_for_format")
    assert peak < 16 * MiB
    png = decode_and_resize(raw, ResizeSpec(resize_mode="keep_ratio", output_format="png"))
    assert (png.width, png.height) == (256, 76800)  # PNG stores it: what img2dataset's keep_ratio asks for


@pytest.mark.parametrize(("output_format", "longest"), [("jpg", 65_500), ("webp", 16_383)])
def test_each_output_formats_side_limit_is_checked_before_decoding(output_format: str, longest: int) -> None:
    """Found by the fuzz pass: a 2×65,535 TIFF decoded, then failed in the JPEG encoder (libjpeg stops at 65,500)."""
    fits, too_long = (encode(Image.new("L", (1, side), 128), "PNG") for side in (longest, longest + 1))
    spec = ResizeSpec(resize_mode="no", output_format=output_format)
    assert decode_and_resize(fits, spec).height == longest
    assert outcome(peak_bytes(lambda: decode_and_resize(too_long, spec))[0]) == (
        "rejected", "resize:too_large_for_format")


@pytest.mark.parametrize("size", [(7, 900), (900, 7), (97, 251), (640, 480), (4000, 3000)], ids=str)
def test_center_crop_resamples_only_the_crop_and_matches_resize_then_crop(size: tuple[int, int]) -> None:
    """The same filter over the same source pixels; Pillow may order the two passes differently for a region than
    for the whole image, which moves noise (the worst case) by a grey level or two on average."""
    width, height = size
    source = Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    out = decode_and_resize(encode(source, "PNG"), ResizeSpec(image_size=64, resize_mode="center_crop",
                                                              output_format="png"))
    side = min(size)
    scaled = (64, round(height * 64 / side)) if side == width else (round(width * 64 / side), 64)
    upscale = scaled[0] * scaled[1] > width * height
    full = source.resize(scaled, Image.Resampling.LANCZOS if upscale else Image.Resampling.BOX)
    left, top = (full.width - 64) // 2, (full.height - 64) // 2
    expected = np.asarray(full.crop((left, top, left + 64, top + 64)), dtype=int)
    assert np.abs(np.asarray(Image.open(io.BytesIO(out.data)), dtype=int) - expected).mean() < 2


def test_decode_larger_than_the_whole_budget_is_refused_not_run_alone() -> None:
    raw = encode(Image.new("RGBA", (2000, 2000), (10, 20, 30, 128)), "PNG")  # ~36 MB at its peak
    budget = Budget(16 * MiB)
    with pytest.raises(ImageRejected) as refused:
        decode_and_resize(raw, ResizeSpec(), budget)
    assert refused.value.reason == "decode:over_budget"
    assert budget.peak == 0 and budget.held == 0
    assert decode_and_resize(raw, ResizeSpec(), Budget(64 * MiB)).width == 256


# --- finding 13: the budget holds what a decode allocates at its peak, counted by mode, format and step ---------------

W = H = 2000


def _noise(mode: str, seed: int = 0) -> Image.Image:
    """A realistic photo stand-in: a gradient with noise (compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    grad = np.add.outer(np.arange(H), np.arange(W)) * 255 // (H + W)
    arr = (rng.integers(0, 64, (H, W, 4)) + grad[..., None] // 2 + np.array([0, 40, 80, 120])).astype(np.uint8)
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.fromarray(arr[..., : len(mode)], mode)
    if mode == "I;16":
        return Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    return Image.fromarray(arr, "RGBA").convert(mode)


def _palette() -> Image.Image:
    return _noise("RGB").quantize(256)


def _first_scan_one_component(raw: bytes) -> bytes:
    """A sequential JPEG rewritten so its first scan carries only the first component (multi-scan, as libjpeg sees
    it: it then buffers every coefficient of the image, as for a progressive file)."""
    sos = raw.index(b"\xff\xda")
    length, components = struct.unpack_from(">HB", raw, sos + 2)
    header = struct.pack(">HB", 8, 1) + raw[sos + 5: sos + 7] + raw[sos + 5 + 2 * components: sos + 2 + length]
    return raw[: sos + 2] + header + raw[sos + 2 + length:]


CASES = {
    "png-RGB": lambda: encode(_noise("RGB"), "PNG", compress_level=1),
    "png-RGBA": lambda: encode(_noise("RGBA"), "PNG", compress_level=1),
    "png-LA": lambda: encode(_noise("LA"), "PNG", compress_level=1),
    "png-L": lambda: encode(_noise("L"), "PNG", compress_level=1),
    "png-1": lambda: encode(_noise("1"), "PNG", compress_level=1),
    "png-I;16": lambda: encode(_noise("I;16"), "PNG", compress_level=1),
    "png-P": lambda: encode(_palette(), "PNG", compress_level=1),
    "png-P-transparency": lambda: encode(_palette(), "PNG", compress_level=1, transparency=0),
    "jpeg-420": lambda: encode(_noise("RGB"), "JPEG", quality=90),
    "jpeg-progressive-420": lambda: encode(_noise("RGB"), "JPEG", quality=90, progressive=True),
    "jpeg-progressive-444": lambda: encode(_noise("RGB"), "JPEG", quality=90, progressive=True, subsampling=0),
    "jpeg-multiscan": lambda: _first_scan_one_component(encode(_noise("RGB"), "JPEG", quality=90)),
    "jpeg-L": lambda: encode(_noise("L"), "JPEG", quality=90),
    "jpeg-CMYK": lambda: encode(_noise("CMYK"), "JPEG", quality=90),
    "jpeg-CMYK-progressive": lambda: encode(_noise("CMYK"), "JPEG", quality=90, progressive=True),
    "gif": lambda: encode(_palette(), "GIF"),
    "gif-transparency": lambda: encode(_palette(), "GIF", transparency=0),
    "webp-RGB": lambda: encode(_noise("RGB"), "WEBP", quality=80, method=0),
    "webp-RGBA": lambda: encode(_noise("RGBA"), "WEBP", quality=80, method=0),
    "webp-lossless": lambda: encode(_noise("RGBA"), "WEBP", lossless=True, method=0),
    "bmp": lambda: encode(_noise("RGB"), "BMP"),
    "tiff-RGB": lambda: encode(_noise("RGB"), "TIFF"),
    "tiff-RGBA-deflate": lambda: encode(_noise("RGBA"), "TIFF", compression="tiff_adobe_deflate"),
    "tiff-LA": lambda: encode(_noise("LA"), "TIFF", compression="tiff_lzw"),
    "tiff-PA": lambda: encode(_palette().convert("PA"), "TIFF", compression="tiff_lzw"),
    "tiff-CMYK": lambda: encode(_noise("CMYK"), "TIFF", compression="tiff_lzw"),
    "tiff-F": lambda: encode(_noise("F"), "TIFF", compression="tiff_lzw"),
    "tiff-I": lambda: encode(_noise("I"), "TIFF", compression="tiff_lzw"),
    "tiff-one-strip": lambda: encode(_noise("RGBA"), "TIFF", compression="tiff_lzw", strip_size=2**31 - 1),
    "tiff-jpeg": lambda: encode(_noise("RGB"), "TIFF", compression="jpeg"),
}
SPECS = {"border": {}, "no": {"resize_mode": "no"}, "center_crop": {"resize_mode": "center_crop"}}


# every case with border; the other modes (their resize, crop and output terms) on a few
MEASURED = [(case, "border") for case in CASES] + [
    (case, spec_name) for case in ("png-RGBA", "png-LA", "jpeg-progressive-420", "webp-RGBA")
    for spec_name in ("no", "center_crop")]


@pytest.mark.parametrize(("case", "spec_name"), MEASURED)
def test_budget_covers_the_measured_peak(case: str, spec_name: str) -> None:
    raw = CASES[case]()
    budget = Budget(2**40)
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec(**SPECS[spec_name]), budget))
    assert isinstance(result, DecodedImage) or case == "jpeg-multiscan", outcome(result)
    per_pixel = f"measured {peak / (W * H):.2f} B/px, held {budget.peak / (W * H):.2f} B/px"
    assert peak <= budget.peak, per_pixel
    assert budget.peak <= 1.6 * peak + 4 * MiB, per_pixel  # an upper bound, not a wild one


def test_budget_covers_an_upscale() -> None:
    """keep_ratio of a 4×1000 image: 256×64,000, 16 megapixels the budget must count as the result (4 bytes each)."""
    raw = encode(_noise("RGB").resize((4, 1000)), "PNG")
    budget = Budget(2**40)
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec(resize_mode="keep_ratio"), budget))
    assert outcome(result) == ("ok", (256, 64000))
    assert peak <= budget.peak, (peak / MiB, budget.peak / MiB)


# --- finding 14: only the allowed formats' parsers ever read a file ---------------------------------------------------

def _psd(width: int = 8, height: int = 6) -> bytes:
    header = b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(3 * width * height)  # no sections, raw RGB


FOREIGN = {  # tiny valid files in formats Pillow reads and we do not; the plugin whose parser must never run
    "ico": (lambda: encode(Image.new("RGB", (16, 16), "red"), "ICO"), IcoImagePlugin.IcoImageFile),
    "pcx": (lambda: encode(Image.new("RGB", (16, 16), "red"), "PCX"), PcxImagePlugin.PcxImageFile),
    "sgi": (lambda: encode(Image.new("RGB", (16, 16), "red"), "SGI"), SgiImagePlugin.SgiImageFile),
    "dds": (lambda: encode(Image.new("RGBA", (16, 16), "red"), "DDS"), DdsImagePlugin.DdsImageFile),
    "psd": (_psd, PsdImagePlugin.PsdImageFile),
    "tga": (lambda: encode(Image.new("RGB", (16, 16), "red"), "TGA"), TgaImagePlugin.TgaImageFile),
}


def _spy_on_open(monkeypatch: pytest.MonkeyPatch, plugin: type) -> list[str]:
    calls: list[str] = []
    original = plugin._open

    def spy(self) -> None:  # records that the parser ran; behaviour unchanged
        calls.append(plugin.__name__)
        original(self)

    monkeypatch.setattr(plugin, "_open", spy)
    return calls


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_format_never_reaches_its_parser(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    make, plugin = FOREIGN[name]
    raw = make()
    assert Image.open(io.BytesIO(raw)).format == plugin.format  # Pillow would read it, given the chance
    calls = _spy_on_open(monkeypatch, plugin)
    with pytest.raises(ImageRejected) as refused:
        decode_and_resize(raw, ResizeSpec())
    # TGA has no signature of its own; a true-colour TGA's first bytes happen to be CUR's, which is how it is known
    assert refused.value.reason == "decode:unsupported_format"
    assert calls == []


def test_unidentified_bytes_reach_no_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Formats without a signature check (TGA, SPIDER, IM, ...) are tried on every file nothing else claimed."""
    plugins = (TgaImagePlugin.TgaImageFile, SpiderImagePlugin.SpiderImageFile, ImImagePlugin.ImImageFile,
               ImtImagePlugin.ImtImageFile, IptcImagePlugin.IptcImageFile, PcdImagePlugin.PcdImageFile)
    calls = {plugin.__name__: _spy_on_open(monkeypatch, plugin) for plugin in plugins}
    with pytest.raises(ImageRejected) as refused:
        decode_and_resize(b"<!doctype html><html><body>Not found</body></html>" * 20, ResizeSpec())
    assert refused.value.reason == "decode:not_an_image"
    assert {name: ran for name, ran in calls.items() if ran} == {}


# --- found while fuzzing and reading the plugins: files that make Pillow allocate or loop while opening ---------------

def _gif_one_frame(screen: tuple[int, int], frame: tuple[int, int], disposal: int) -> bytes:
    """A GIF whose first frame (declared frame × frame, a few bytes of LZW data) has the given disposal method."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    out += b"\x21\xf9\x04" + bytes([disposal << 2 | 1]) + b"\0\0\0\0"  # graphic control: disposal, transparent 0
    return out + b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00\x3b"


def test_gif_first_frame_disposal_allocates_nothing_while_opening() -> None:
    raw = _gif_one_frame((1, 1), (9000, 9000), disposal=2)  # Pillow filled a 9000×9000 canvas for it at open
    assert len(raw) < 50
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec(max_image_pixels=1_000_000)))
    assert outcome(result) == ("rejected", "decode:too_many_pixels")
    assert peak < 16 * MiB, peak / MiB


def test_gif_disposal_cleared_decodes_the_same_first_frame() -> None:
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB").quantize(64)
              for _ in range(2)]
    for disposal in (0, 1, 2, 3):
        raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=disposal, transparency=0)
        out = decode_and_resize(raw, ResizeSpec(resize_mode="no", output_format="png"))
        first = Image.open(io.BytesIO(raw))
        expected = Image.new("RGB", first.size, "white")
        expected.paste(first.convert("RGBA"), mask=first.convert("RGBA").getchannel("A"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))), np.asarray(expected)), disposal


def _webp_with_canvas(side: int) -> bytes:
    """A two-frame 16×16 animated WebP whose header declares a side × side canvas."""
    frames = [Image.new("RGBA", (16, 16), (255, 0, 0, 255)), Image.new("RGBA", (16, 16), (0, 255, 0, 128))]
    raw = bytearray(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert raw[12:16] == b"VP8X"
    raw[24:30] = (side - 1).to_bytes(3, "little") * 2
    return bytes(raw)


def test_webp_canvases_are_held_before_pillow_opens_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the fuzz pass. libwebp callocs two canvas-sized buffers while Pillow opens a WebP, before any check
    of ours: free from fresh pages, but a long-running worker's heap has holes, and calloc zeroes reused pages (122 MB
    for this 140-byte file, measured)."""
    raw = _webp_with_canvas(4000)
    hole = [bytes(2000) for _ in range(100_000)]
    sentinel = bytes(2000)  # allocated after them: freeing them leaves a 200 MB hole, not a heap top to trim
    del hole
    opened = _spy_on_open(monkeypatch, WebPImagePlugin.WebPImageFile)
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec(), Budget(16 * MiB)))
    assert outcome(result) == ("rejected", "decode:over_budget")
    assert opened == [] and peak < 8 * MiB, (opened, peak / MiB)
    del sentinel
    budget = Budget(64 * MiB)
    assert decode_and_resize(_webp_with_canvas(1000), ResizeSpec(), budget).width == 256  # counted, and decoded
    assert opened == ["WebPImageFile"] and budget.peak >= 1000 * 1000 * 12  # the image and both canvases


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def test_png_text_bomb_is_refused_while_opening() -> None:
    """64 zTXt chunks of 1 MiB each deflate to 64 KB; Pillow keeps up to 64 MiB of text per image by default."""
    base = encode(Image.new("RGB", (8, 8), "red"), "PNG")
    text = zlib.compress(b"a" * (MiB - 1024), 9)
    chunks = b"".join(_png_chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(64))
    raw = base[:33] + chunks + base[33:]  # after IHDR
    assert len(raw) < 100_000
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec()))
    assert outcome(result) == ("rejected", "decode:bad_header")
    assert peak < 16 * MiB, peak / MiB
    modest = base[:33] + _png_chunk(b"zTXt", b"xmp\0\0" + zlib.compress(b"b" * 200_000)) + base[33:]
    assert decode_and_resize(modest, ResizeSpec()).width == 256  # real metadata still decodes


def _tiff_with_strips(strips: int) -> bytes:
    """A 64×64 uncompressed greyscale TIFF that lists ``strips`` strip offsets (a real one needs 64)."""
    data = 8 + 2 + 8 * 12 + 4
    offsets = struct.pack(f"<{strips}I", *range(1000, 1000 + strips))

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    ifd = [entry(256, 4, 1, 64), entry(257, 4, 1, 64), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
           entry(262, 3, 1, 1), entry(273, 4, strips, data), entry(278, 4, 1, 1),
           entry(279, 4, strips, data + len(offsets))]
    return (b"II*\0" + struct.pack("<IH", 8, len(ifd)) + b"".join(ifd) + b"\0\0\0\0" + offsets
            + struct.pack(f"<{strips}I", *([1] * strips)))


def test_tiff_strip_offset_bomb_is_refused_before_pillow_builds_its_tiles() -> None:
    raw = _tiff_with_strips(200_000)  # 1.5 MiB; Pillow built 200,000 tiles (59 MB), then decoded each: 23 s
    start = time.monotonic()
    result, peak = peak_bytes(lambda: decode_and_resize(raw, ResizeSpec()))
    assert outcome(result) == ("rejected", "decode:bad_header")
    assert time.monotonic() - start < 5  # today's code: over 20 s on this machine
    assert peak < 16 * MiB, peak / MiB
    legit = encode(Image.new("L", (64, 64), 7), "TIFF", strip_size=64)  # one strip a row: 64 of them
    assert decode_and_resize(legit, ResizeSpec()).width == 256
