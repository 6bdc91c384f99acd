"""Fingerprints of what an image shows, not of the blank around it: the perceptual dedup tier's per-row evidence.

On real clip art and cut-outs most of a picture is white (a transparent PNG flattened, a page, the padding of the
``border`` resize mode) and its pHash is decided by where a small drawing sits: unrelated drawings share hashes and
a re-encode moves the hash by 14-20 bits (measured on the development pool, benchmarks/realpool.py). So the hash
stage first finds the **content box**: it strips white margins and uniform frames (an added border, then the page
inside it), alternately, up to four times. Then it stores:

- ``content_phash``: 64-bit DCT hashes of four views of the box, each padded to a square (so a thin drawing keeps
  its shape): the whole box, its centre 90% and 80% (a copy cropped by 5-10% a side matches one of them), and the
  box mirrored; and a mean hash of the box (which of its 8 × 8 cells are darker than the whole). The DCT signs of a
  roughly symmetric drawing are near zero and flip under a re-encode (a thin-lined bicycle moved 26 bits under JPEG
  q75); the cells' ink does not. A view with no contrast left (the white inside of an outlined square) has no
  hash: it would match every other blank view.
- ``content_thumbnail`` (32 × 32 grey, strokes thickened) and ``content_colors`` (8 × 8 RGB) of the box stretched to a
  square: the second check, independent of the hash, that two rows must pass before they are linked (``verify``
  below). 32 px compared in 4 × 4 pixel blocks sees details that tell look-alike designs apart (a ring of small
  stars from four large ones) which 16 px blurred away. Strokes are thickened (a 3-pixel minimum filter) after the
  box is stretched to 128 px, so by the same share of the drawing at any stored size (the 16 px thumbnail
  thickened them at the stored size, which made a half-size copy darker than its original). Thumbnails stored at
  16 × 16 by earlier runs are still read, upsampled.
- ``content_fraction``: the share of the image's pixels that differ from its background colour: near zero for a
  transparent PNG flattened to white, one flat colour or a speck on a page (the rules stage's low-information rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VIEWS = ("box", "centre_90", "centre_80", "mirror", "box_mean")  # the order of content_phash's entries
CENTRE = {"box": 1.0, "centre_90": 0.9, "centre_80": 0.8, "mirror": 1.0, "box_mean": 1.0}
TOLERANCE = 32  # a channel this far from the background colour is content (JPEG noise and ringing stay below it)
FRAME_EDGE = 2  # pixels stepped over inside a stripped frame: resizing and JPEG blend its inner edge
MIN_VIEW_STD = 8.0  # grey standard deviation of a view below which it is blank and gets no hash
THUMBNAIL, COLOR_GRID = 32, 8
OLD_THUMBNAIL = 16  # the side runs stored before the 32 px thumbnails used
WORKING_SIDE = 128  # the content box is stretched to this square before its strokes are thickened


@dataclass(frozen=True)
class ContentPrint:
    phashes: list[int | None]  # one per VIEWS entry, signed 64-bit
    thumbnail: bytes  # THUMBNAIL² grey bytes of the stretched content box
    colors: bytes  # COLOR_GRID² RGB bytes of the stretched content box
    fraction: float  # share of pixels that are content


def _mask_box(pixels: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int] | None:
    """The box of rows and columns holding pixels unlike ``background`` (two at least, and 1% of the line: JPEG
    specks do not count), or None."""
    mask = (np.abs(pixels - np.asarray(background, dtype=np.int16)) > TOLERANCE).any(axis=2)
    rows = np.flatnonzero(mask.sum(axis=1) >= max(2, mask.shape[1] // 100))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(2, mask.shape[0] // 100))
    if len(rows) < 2 or len(cols) < 2:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def content_box(pixels: np.ndarray, passes: int = 4) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of what is drawn: white margins stripped, then a uniform frame of another colour
    (an added border) and the margins inside it, up to ``passes`` times."""
    white = np.array([255, 255, 255], dtype=np.int16)
    box = (0, 0, pixels.shape[1], pixels.shape[0])
    for _ in range(passes):
        x0, y0, x1, y1 = box
        inside = pixels[y0:y1, x0:x1].astype(np.int16)
        found = _mask_box(inside, white)
        if found is not None:
            box = (x0 + found[0], y0 + found[1], x0 + found[2], y0 + found[3])
        x0, y0, x1, y1 = box
        inside = pixels[y0:y1, x0:x1].astype(np.int16)
        ring = np.concatenate([inside[0], inside[-1], inside[:, 0], inside[:, -1]])
        frame = np.median(ring, axis=0)
        if np.abs(frame - white).max() <= TOLERANCE or \
                (np.abs(ring - frame).max(axis=1) <= TOLERANCE / 2).mean() < 0.95 or min(inside.shape[:2]) < 8:
            break  # no flat frame of another colour around the drawing (a photo's background is not one)
        found = _mask_box(inside, frame)
        if found is None:
            break
        inner = (x0 + found[0] + FRAME_EDGE, y0 + found[1] + FRAME_EDGE, x0 + found[2] - FRAME_EDGE,
                 y0 + found[3] - FRAME_EDGE)
        if inner[2] - inner[0] < 4 or inner[3] - inner[1] < 4:
            break
        box = inner
    return box


def content_fraction(pixels: np.ndarray) -> float:
    """The share of pixels more than TOLERANCE from the background (the median of the outer ring)."""
    values = pixels.astype(np.int16)
    ring = np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])
    background = np.median(ring, axis=0).astype(np.int16)
    return float((np.abs(values - background) > TOLERANCE).any(axis=2).mean())


def dct_hash(grey: np.ndarray) -> int:
    """64 bits: which of the 8 × 8 lowest DCT coefficients of a 32 × 32 grey image are above their median, as a
    signed int64 (row-major, first bit most significant)."""
    from scipy.fft import dctn

    low = dctn(grey.astype(np.float64), norm="ortho")[:8, :8]
    bits = np.packbits((low > np.median(low)).reshape(-1))
    return int(np.frombuffer(bits.tobytes(), dtype=">i8")[0])


def _square(image: object) -> object:
    from PIL import Image

    width, height = image.size  # type: ignore[attr-defined]
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), 255 if image.mode == "L" else (255, 255, 255))  # type: ignore
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _centre(image: object, share: float) -> object:
    width, height = image.size  # type: ignore[attr-defined]
    dx, dy = width * (1 - share) / 2, height * (1 - share) / 2
    return image.crop((round(dx), round(dy), round(width - dx), round(height - dy)))  # type: ignore[attr-defined]


def content_print(rgb: object) -> ContentPrint:
    """The content fingerprints of a decoded RGB image (alpha already flattened)."""
    from PIL import Image, ImageFilter, ImageOps

    pixels = np.asarray(rgb)
    box = rgb.crop(content_box(pixels))  # type: ignore[attr-defined]
    codes: list[int | None] = []
    grey_box = box.convert("L")
    # strokes thickened at one working scale, whatever the stored size: a thin line keeps its ink at 32 px, and a
    # half-size copy is thickened exactly as much as its original
    working = grey_box.resize((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BILINEAR)
    # only dark strokes on light are thickened: where the drawing's own edge is dark the minimum would erase light
    # details (the stars on a flag)
    if _edge_grey(np.asarray(working)) >= 128:
        working = working.filter(ImageFilter.MinFilter(3))
    thumbnail = working.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    # the mean hash keeps its 16 px cells of strokes thickened at the stored scale (the search's codes unchanged)
    inked = grey_box.filter(ImageFilter.MinFilter(3)) if min(box.size) >= 12 else grey_box
    cells = inked.resize((OLD_THUMBNAIL, OLD_THUMBNAIL), Image.Resampling.BOX)
    for view in VIEWS[:4]:
        part = ImageOps.mirror(grey_box) if view == "mirror" else _centre(grey_box, CENTRE[view])
        grey = np.asarray(_square(part).resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
        codes.append(dct_hash(grey) if grey.std() >= MIN_VIEW_STD else None)
    codes.append(mean_hash(np.asarray(cells, dtype=np.float32)))
    colors = box.resize((COLOR_GRID, COLOR_GRID), Image.Resampling.BOX).tobytes()
    return ContentPrint(codes, thumbnail.tobytes(), colors, content_fraction(pixels))


def _edge_grey(grey: np.ndarray) -> float:
    """The median of a grey image's outer ring: white between the strokes of line art, the field of a flag."""
    return float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))


def mean_hash(grey: np.ndarray) -> int | None:
    """64 bits: which 8 × 8 cells of the thumbnail are darker than its mean (None for a blank thumbnail)."""
    if grey.std() < MIN_VIEW_STD:
        return None
    side = grey.shape[0] // 8
    cells = grey.reshape(8, side, 8, side).mean(axis=(1, 3))
    bits = np.packbits((cells < cells.mean()).reshape(-1))
    return int(np.frombuffer(bits.tobytes(), dtype=">i8")[0])


# The second check: two rows are linked only if their stretched content thumbnails, one registered onto the
# other, agree block by block. The registration tries windows of the second image around the view the hashes
# matched (its centre 100%, 90% or 80%), a little larger or smaller and shifted, so a copy cropped unevenly or
# trimmed a pixel differently still lines up; the largest mean difference of any block of the best window is what a
# local change (a different mouth, a clock's hands, a flag's emblem) shows and a re-encode does not.
BLOCKS = 8  # the thumbnails' 32 × 32 pixels are compared in 8 × 8 blocks of 4 × 4
BLUR = 1.4  # pixels of Gaussian blur on the normalised thumbnails before they are compared


def _sample(images: np.ndarray, windows: np.ndarray, out: int) -> np.ndarray:
    """Bilinear samples of each image (n, h, w[, c]) over its window (n, 4: left, top, right, bottom as shares of
    the image) on an out × out grid; samples outside the image take the nearest edge."""
    n, height, width = images.shape[:3]
    steps = (np.arange(out) + 0.5) / out
    xs = np.clip((windows[:, 0, None] + steps * (windows[:, 2] - windows[:, 0])[:, None]) * width - 0.5, 0, width - 1)
    ys = np.clip((windows[:, 1, None] + steps * (windows[:, 3] - windows[:, 1])[:, None]) * height - 0.5, 0,
                 height - 1)
    x0, y0 = np.floor(xs).astype(np.intp), np.floor(ys).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx, wy = (xs - x0)[:, None, :], (ys - y0)[:, :, None]
    if images.ndim == 4:
        wx, wy = wx[..., None], wy[..., None]
    index = np.arange(n)[:, None, None]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return images[index, yy[:, :, None], xx[:, None, :]]

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def _colour_cells(grid: np.ndarray) -> np.ndarray:
    """An 8 × 8 colour grid averaged into 4 × 4 cells (a cell's mean is steadier than a point sample)."""
    n = len(grid)
    return grid.reshape(n, 4, COLOR_GRID // 4, 4, COLOR_GRID // 4, 3).mean(axis=(2, 4))


def _normalised(grey: np.ndarray) -> np.ndarray:
    """Zero mean and a fixed spread (contrast-free), blurred so a pixel of misregistration costs little."""
    from scipy.ndimage import gaussian_filter

    centred = grey - grey.mean(axis=(1, 2), keepdims=True)
    scaled = centred * (48.0 / np.maximum(centred.std(axis=(1, 2), keepdims=True), 4.0))
    return gaussian_filter(scaled, (0, BLUR, BLUR))


def thumbnails(blobs: list[bytes], size: int, channels: int = 1) -> np.ndarray:
    shape = (len(blobs), size, size) if channels == 1 else (len(blobs), size, size, channels)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(shape).astype(np.float32)


def content_thumbnails(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The stored grey content thumbnails at THUMBNAIL² (n, side, side), and which of them were stored at 16 × 16 by
    a run before the 32 px thumbnails (kept on resume): those are upsampled by repeating pixels."""
    old = np.array([len(blob) == OLD_THUMBNAIL ** 2 for blob in blobs], dtype=bool)
    if not old.any():
        return thumbnails(blobs, THUMBNAIL), old
    out = np.empty((len(blobs), THUMBNAIL, THUMBNAIL), dtype=np.float32)
    if (~old).any():
        out[~old] = thumbnails([b for b, o in zip(blobs, old) if not o], THUMBNAIL)
    out[old] = coarse(thumbnails([b for b, o in zip(blobs, old) if o], OLD_THUMBNAIL))
    return out, old


def coarse(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails at the detail of 16 × 16 ones, at THUMBNAIL²: a pair with an old 16 px side is compared so."""
    factor = THUMBNAIL // OLD_THUMBNAIL
    if thumbs.shape[1] == THUMBNAIL:
        n = len(thumbs)
        thumbs = thumbs.reshape(n, OLD_THUMBNAIL, factor, OLD_THUMBNAIL, factor).mean(axis=(2, 4))
    return thumbs.repeat(factor, axis=1).repeat(factor, axis=2)


def _block_worst(difference: np.ndarray) -> np.ndarray:
    """The largest mean of any BLOCKS × BLOCKS block: a local change shows, noise spread thin does not."""
    n, block = len(difference), THUMBNAIL // BLOCKS
    return difference.reshape(n, BLOCKS, block, BLOCKS, block).mean(axis=(2, 4)).max(axis=(1, 2))


def verify(thumbs_a: np.ndarray, thumbs_b: np.ndarray, colors_a: np.ndarray, colors_b: np.ndarray,
           centre_b: np.ndarray, mirror_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pairs (row a's whole content, row b's centre ``centre_b`` share): the largest block difference of the
    best-registered window (normalised grey, 0-255 scale) and the largest colour difference of their 4 × 4 grids at
    that window. ``mirror_a`` flips row a first (a mirrored copy).

    The window of b starts at its centre view and each of its four edges is then moved, one at a time, to where the
    mean difference is least (REGISTRATION_STEPS, twice round): a copy cropped unevenly or trimmed a pixel
    differently lines up edge by edge, which a grid over whole windows would need hundreds of tries for."""
    n = len(thumbs_a)
    if not n:
        return np.zeros(0), np.zeros(0)
    thumbs_a = np.where(mirror_a[:, None, None], thumbs_a[:, :, ::-1], thumbs_a)
    colors_a = np.where(mirror_a[:, None, None, None], colors_a[:, :, ::-1], colors_a)
    whole = np.tile([0.0, 0.0, 1.0, 1.0], (n, 1))
    reference = _normalised(_sample(thumbs_a, whole, THUMBNAIL))
    half = centre_b / 2
    windows = np.stack([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], axis=1)

    def cost(candidate: np.ndarray) -> np.ndarray:
        return np.abs(reference - _normalised(_sample(thumbs_b, candidate, THUMBNAIL))).mean(axis=(1, 2))

    current = cost(windows)
    for _ in range(2):
        for edge in range(4):
            for step in REGISTRATION_STEPS:
                candidate = windows.copy()
                candidate[:, edge] += step
                trial = cost(candidate)
                better = trial < current
                windows = np.where(better[:, None], candidate, windows)
                current = np.minimum(trial, current)
    worst = _block_worst(np.abs(reference - _normalised(_sample(thumbs_b, windows, THUMBNAIL))))
    cells_a = _colour_cells(_sample(colors_a, whole, COLOR_GRID))
    cells_b = _colour_cells(_sample(colors_b, windows, COLOR_GRID))
    return worst, np.abs(cells_a - cells_b).reshape(n, -1).max(axis=1)


REGISTRATION_STEPS = (-0.04, -0.02, -0.01, 0.01, 0.02, 0.04)  # moves of one window edge, as shares of the image
