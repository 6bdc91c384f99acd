"""A synthetic, deterministic image-text pool with planted noise, for `curate demo`, tests and benchmarks.

Every image is a drawn scene (a coloured shape on a background of another colour) whose caption names the shape
and both colours, so alignment is checkable by eye and by a CLIP score. A fixed fraction of rows is planted with
one fault each (misaligned caption, duplicates, HTTP errors, truncated bytes, a decompression bomb, ...); the
row's `kind` says which, so a run's ledger can be compared with the truth.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

_TEMPLATES = (
    "{a_c} {colour} {shape} on {a_bg} {bg} background",
    "photo of {a_s} {size} {colour} {shape} over {bg}",
    "{colour} {shape} on a plain {bg} background",
    "an image showing {a_c} {colour} {shape} against {bg}",
    "{a_s} {size} {colour} {shape} drawn on {bg}",
    "simple graphic: {colour} {shape}, {bg} backdrop",
    "the {shape} is {colour} and the background is {bg}",
)
_ALPHA_TEMPLATES = ("{a_c} {colour} {shape} on a transparent background", "{colour} {shape} cutout, no background")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_HTML = b"<!doctype html><html><head><title>Page not found</title></head><body><h1>Oops!</h1></body></html>\n"

# Planted kinds with their share of n (and a floor of one); "clean" takes the rest.
_FRACTIONS = {
    "misaligned": 0.10, "exact_duplicate": 0.04, "near_duplicate": 0.04,
    "http_404": 0.02, "http_403": 0.02, "http_500": 0.02, "flaky": 0.01, "redirect": 0.01, "alpha": 0.01,
}
_ROUTE = {"http_404": "missing", "http_403": "forbidden", "http_500": "error",
          "slow": "slow", "flaky": "flaky", "redirect": "redirect"}


@dataclass(frozen=True)
class PoolItem:
    name: str  # file name under root/"files", e.g. "000012.jpg"
    route: str  # FaultServer route: "img", "missing", "slow", "flaky", "redirect", ...
    caption: str
    kind: str  # what was planted, or "clean"


def _counts(n: int) -> dict[str, int]:
    counts = {kind: max(1, round(frac * n)) for kind, frac in _FRACTIONS.items()}
    few = 1 + (n >= 500)  # "one or two" items, two once the pool is big enough to afford them
    counts.update(slow=few, truncated=few, too_small=few, bomb=1, not_an_image=1, extreme_aspect=1)
    return counts


def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(rng: np.random.Generator, shape: str, colour: str, bg: str, size: str, alpha: bool = False) -> str:
    templates = _ALPHA_TEMPLATES if alpha else _TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    return template.format(shape=shape, colour=colour, bg=bg, size=size, a_c=_art(colour), a_bg=_art(bg), a_s=_art(size))


def _pick_scene(rng: np.random.Generator) -> tuple[str, str, str]:
    names = list(COLOURS)
    colour, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    return SHAPES[int(rng.integers(len(SHAPES)))], colour, bg


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        radii, corners = [r], 4
    elif shape == "triangle":
        radii, corners = [r], 3
    else:  # star: alternate outer and inner points
        radii, corners = [r, 0.45 * r], 10
    return [
        (cx + radii[k % len(radii)] * math.cos(turn + 2 * math.pi * k / corners),
         cy + radii[k % len(radii)] * math.sin(turn + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _draw(rng: np.random.Generator, w: int, h: int, shape: str, colour: str, bg: str, alpha: bool = False,
          noise: bool = True) -> tuple[Image.Image, str]:
    """Renders one scene; returns the image and a size word ("small", "medium", "large") for the caption."""
    frac = float(rng.uniform(0.3, 0.9))
    r = frac * min(w, h) / 2
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    if alpha:
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        fill: tuple[int, ...] = (*COLOURS[colour], 255)
    else:
        # A random linear gradient over the background so no two images share bytes.
        angle, amp = rng.uniform(0, 2 * math.pi), rng.uniform(5, 25)
        ramp = np.linspace(-1, 1, w)[None, :] * math.cos(angle) + np.linspace(-1, 1, h)[:, None] * math.sin(angle)
        base = np.asarray(COLOURS[bg], dtype=np.float32) + (amp * ramp)[:, :, None]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        fill = COLOURS[colour]
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    turn = float(rng.uniform(0, 2 * math.pi)) if shape == "square" else -math.pi / 2 + float(rng.uniform(-0.3, 0.3))
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.3)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, turn), fill=fill)
    if noise and not alpha:  # mild sensor-like noise: near-duplicate detection must look past it
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, size=(h, w, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, "small" if frac < 0.5 else "medium" if frac < 0.72 else "large"


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    side, aspect = rng.uniform(200, 480), rng.uniform(0.6, 1.6)
    return (int(np.clip(side * math.sqrt(aspect), 160, 640)), int(np.clip(side / math.sqrt(aspect), 160, 640)))


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    options = {"JPEG": {"quality": 90}, "WEBP": {"quality": 85}, "PNG": {}}[fmt]
    img.save(path, format=fmt, **options)


def bomb_png(side: int = 20000, height: int | None = None) -> bytes:
    """A 1-bit greyscale PNG declaring side x height pixels (square by default); all-zero rows deflate ~1000:1,
    built in well under 1 s."""
    height = side if height is None else height
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + packed bits
    comp = zlib.compressobj(9)
    block = row * 500  # stream in blocks so memory stays small
    idat = b"".join(comp.compress(block) for _ in range(height // 500)) + comp.compress(row * (height % 500))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _plan(n: int, rng: np.random.Generator) -> list[str]:
    counts = _counts(n)
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    if len(kinds) >= n:
        raise ValueError(f"make_pool needs n >= 20 to plant every kind with clean rows left over, got n={n}")
    kinds += ["clean"] * (n - len(kinds))
    kinds = [kinds[i] for i in rng.permutation(n)]
    first_clean = kinds.index("clean")  # duplicates need an earlier clean row to copy: put one first
    kinds[0], kinds[first_clean] = kinds[first_clean], kinds[0]
    return kinds


def make_pool(root: Path, n: int = 1000, seed: int = 0) -> list[PoolItem]:
    """Writes the pool's files under root/"files" and returns one item per row, in row order (len == n)."""
    files = Path(root) / "files"
    files.mkdir(parents=True, exist_ok=True)
    kinds = _plan(n, np.random.default_rng(seed))
    items: list[PoolItem] = []
    clean: list[PoolItem] = []
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, i])  # one stream per row: a row's bytes do not depend on code above it
        shape, colour, bg = _pick_scene(rng)
        fmt = "JPEG"
        if kind in ("clean", "misaligned", "slow", "flaky", "redirect"):
            fmt = str(rng.choice(["JPEG", "PNG", "WEBP"], p=[0.8, 0.1, 0.1]))
        elif kind in ("alpha", "bomb"):
            fmt = "PNG"
        stem = f"{i:06d}"
        name = f"{stem}.{_EXT[fmt]}"
        path = files / name
        route = _ROUTE.get(kind, "img")

        if kind in ("exact_duplicate", "near_duplicate"):
            src = clean[int(rng.integers(len(clean)))]
            if kind == "exact_duplicate":
                name = f"{stem}{Path(src.name).suffix}"
                (files / name).write_bytes((files / src.name).read_bytes())
            else:
                name = f"{stem}.jpg"
                with Image.open(files / src.name) as im:
                    img = im.convert("RGB")
                if rng.random() < 0.5:
                    img.save(files / name, format="JPEG", quality=40)
                else:
                    img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR).save(
                        files / name, format="JPEG", quality=90)
            items.append(PoolItem(name, route, src.caption, kind))
            continue

        if kind == "too_small":
            w, h = 24, 24
        elif kind == "extreme_aspect":
            w, h = 1200, 60
        else:
            w, h = _random_size(rng)
        img, size = _draw(rng, w, h, shape, colour, bg, alpha=kind == "alpha")
        caption = _caption(rng, shape, colour, bg, size, alpha=kind == "alpha")
        if kind == "misaligned":  # describe a different shape, colour and background than the one drawn
            other_shape = SHAPES[(SHAPES.index(shape) + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)]
            others = [c for c in COLOURS if c not in (colour, bg)]
            wrong_colour, wrong_bg = (others[j] for j in rng.choice(len(others), size=2, replace=False))
            caption = _caption(rng, other_shape, wrong_colour, wrong_bg, size)

        if kind in ("http_404", "http_403", "http_500"):
            pass  # the server answers with an error status; no file is needed
        elif kind == "truncated":
            _save(img, path, "JPEG")
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # headers intact, the scan ends halfway
        elif kind == "bomb":
            path.write_bytes(bomb_png())
        elif kind == "not_an_image":
            path.write_bytes(_HTML)  # a soft-404 page behind an image URL
        else:
            _save(img, path, fmt)
        item = PoolItem(name, route, caption, kind)
        items.append(item)
        if kind == "clean":
            clean.append(item)
    return items


def make_sized_pool(root: Path, n: int, seed: int = 0, min_side: int = 100, max_side: int = 2000,
                    png_share: float = 0.2, sides: str = "uniform") -> list[PoolItem]:
    """A clean pool of web-sized images for throughput benchmarks: the longer side uniform (or, with
    sides="log", log-uniform: mostly small) in [min_side, max_side], aspect 0.5-2, JPEG photos with sensor-like
    noise and a `png_share` of flat-coloured PNG graphics (noisy PNGs would be unrealistically large)."""
    if sides not in ("uniform", "log"):
        raise ValueError(f"sides must be 'uniform' or 'log', got {sides!r}")
    files = Path(root) / "files"
    files.mkdir(parents=True, exist_ok=True)
    items: list[PoolItem] = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        shape, colour, bg = _pick_scene(rng)
        side = (rng.uniform(min_side, max_side) if sides == "uniform"
                else math.exp(rng.uniform(math.log(min_side), math.log(max_side))))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = (int(side), max(1, int(side / aspect))) if aspect >= 1 else (max(1, int(side * aspect)), int(side))
        fmt = "PNG" if rng.random() < png_share else "JPEG"
        img, size = _draw(rng, w, h, shape, colour, bg, noise=fmt == "JPEG")
        name = f"{i:06d}.{_EXT[fmt]}"
        _save(img, files / name, fmt)
        items.append(PoolItem(name, "img", _caption(rng, shape, colour, bg, size), "clean"))
    return items


def write_url_list(items: list[PoolItem], base_url: str, path: Path) -> Path:
    """Writes a parquet URL list (url, caption, kind) pointing at a FaultServer at `base_url`."""
    base = base_url.rstrip("/")
    table = pa.table({
        "url": [f"{base}/{item.route}/{item.name}" for item in items],
        "caption": [item.caption for item in items],
        "kind": [item.kind for item in items],
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
