"""The real development pool: real images with human-written descriptions from Debian packages, with web noise planted.

Sources (fetched with ``apt-get download`` into a cache folder and unpacked with ``dpkg -x``: no root needed):

- ``tuxpaint-stamps-default``: ~785 PNG photos and drawings (mostly transparent cut-outs), each with a one-line
  English description in a ``.txt`` beside it and its translations into about 100 languages;
- ``fonts-noto-color-emoji``: ~1,900 colour emoji (no skin-tone variants) drawn with Pillow, captioned with the
  emoji's Unicode name (``unicode-data``'s emoji-test.txt) and its CLDR keywords (``unicode-cldr-core``), whose other
  languages give the translations;
- ``fonts-symbola``: black line art of ~1,600 pictographic symbols (Miscellaneous Symbols, Dingbats, Pictographs,
  Transport, Supplemental), captioned with their Unicode (or CLDR) names: line art on white.

The ``openclipart*`` packages are never used: they are kept for an independent acceptance check.

A seeded share of the pictures is held out as a clean eval set (``eval/eval.parquet``: image_path, caption) and never
enters the pool. Into the pool's rows, noise is planted as the web has it: shuffled captions, captions replaced by a
translation, junk alt-text (file names, "image", "click here", bare URLs), boilerplate captions on many different
images, exact copies, near copies (JPEG re-encodes, half size, 5-10% crops, brightness and colour shifts, mirror,
added border, PNG flattened to JPEG), near-blank images and the demo's download faults. The truth lives apart from
the URL list, in ``truth.parquet``: per row its kind, the picture it shows (``picture``: duplicates share it) and
whether its caption describes it.

    .venv/bin/python benchmarks/realpool.py --out /tmp/realpool            # cache: ~/.cache/curate-realpool
    .venv/bin/python benchmarks/efficacy.py --pool /tmp/realpool           # serves it on 127.0.0.1 and measures

Output: ``files/`` (the served bytes), ``pool.parquet`` (name, route, caption: what ``FaultServer`` serves and the
URL list carries), ``truth.parquet`` (row, name, kind, picture, source, caption_ok, variant, true_caption),
``eval/`` and ``pool.json`` (the settings and counts).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tuxpaint-stamps-default", "fonts-noto-color-emoji", "fonts-symbola", "unicode-data", "unicode-cldr-core")
FORBIDDEN = re.compile(r"openclipart", re.IGNORECASE)  # reserved for the acceptance check

TUXPAINT = "usr/share/tuxpaint/stamps"
NOTO = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SYMBOLA = "usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
UNICODE_DATA = "usr/share/unicode/UnicodeData.txt"
CLDR = "usr/share/unicode/cldr/common/annotations"
# Pictographic blocks of Symbola: things a caption describes (Miscellaneous Symbols, Dingbats, Pictographs,
# Transport, Supplemental). Technical, arrows, shapes and letters are left out: bracket pieces, scan lines and box
# strokes are typography, not pictures a page would caption.
SYMBOL_BLOCKS = ((0x2600, 0x27BF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF))
TRANSLATION_LANGUAGES = ("de", "fr", "es", "it", "pt", "nl", "pl", "ru", "tr", "sv", "ja", "zh", "ko", "el", "fi", "cs")

# Share of the pool's rows planted with each kind of caption noise (the rest keep their true caption)
CAPTION_NOISE = {"shuffled": 0.25, "translated": 0.05, "junk": 0.04, "boilerplate": 0.03}
# Rows added on top of the pictures' own rows, as a share of those
EXTRA_ROWS = {"exact_duplicate": 0.03, "near_blank": 0.02}
NEAR_SOURCES, MAX_VARIANTS = 0.06, 4  # a share of the pictures gets 1-4 near copies of different kinds
FAULTS = {"http_404": 0.006, "http_403": 0.004, "http_500": 0.004, "flaky": 0.004, "redirect": 0.004,
          "truncated": 0.003, "not_an_image": 0.002, "slow": 0.0005, "bomb": 0.0003}
FAULT_ROUTE = {"http_404": "missing", "http_403": "forbidden", "http_500": "error", "flaky": "flaky",
               "redirect": "redirect", "slow": "slow"}
NEAR_VARIANTS = ("jpeg_q40", "jpeg_q75", "half_size", "crop", "brightness", "recolour", "mirror", "border",
                 "png_to_jpeg")
BOILERPLATE = ("High quality clip art PNG for free download", "Royalty free stock illustration, vector graphic")
JUNK = ("image", "click here", "photo", "untitled", "picture", "thumbnail", "Click to enlarge", "no description",
        "IMG_{n:04d}.JPG", "DSC{n:05d}.jpg", "{stem}.png", "{stem}_{n}.gif", "https://cdn.example.com/i/{n}.png",
        "www.example.org/images/{stem}.jpg")


@dataclass
class Picture:
    """One real picture with its human-written description."""

    id: str
    source: str
    caption: str
    image: Path  # a file in the staging folder (PNG, usually RGBA)
    translations: list[str] = field(default_factory=list)
    stem: str = ""


@dataclass
class Row:
    name: str
    route: str
    caption: str
    kind: str
    picture: str | None
    source: str
    caption_ok: bool
    variant: str | None = None
    true_caption: str | None = None


def fetch(cache: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Each package downloaded once into cache/debs and unpacked into cache/tree (one tree: paths do not clash)."""
    refused = [p for p in packages if FORBIDDEN.search(p)]
    if refused:  # before anything is fetched
        raise SystemExit(f"{', '.join(refused)}: the openclipart packages are reserved for the acceptance check")
    debs, tree = cache / "debs", cache / "tree"
    debs.mkdir(parents=True, exist_ok=True)
    for package in packages:
        marker = tree / ".unpacked" / package
        if marker.exists():
            continue
        if not list(debs.glob(f"{package}_*.deb")):
            print(f"realpool: apt-get download {package}", file=sys.stderr)
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True, stdout=subprocess.DEVNULL)
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(deb.name + "\n")
    return tree


def _picture_id(source: str, key: str) -> str:
    return hashlib.blake2b(f"{source}:{key}".encode(), digest_size=6).hexdigest()


def tuxpaint_pictures(tree: Path, staging: Path) -> list[Picture]:
    """Every stamp PNG with a description .txt beside it: its first line is English, ``xx.utf8=...`` lines are
    translations."""
    root = tree / TUXPAINT
    pictures = []
    for text in sorted(root.rglob("*.txt")):
        image = text.with_suffix(".png")
        if not image.exists():
            continue  # SVG stamps: no renderer is assumed
        lines = [line.strip() for line in text.read_text("utf-8", "replace").splitlines() if line.strip()]
        if not lines or "=" in lines[0].split(" ")[0]:
            continue
        translations = [line.split("=", 1)[1].strip() for line in lines[1:]
                        if "=" in line and line.split("=", 1)[0].split(".")[0].split("_")[0].split("@")[0]
                        in TRANSLATION_LANGUAGES and line.split("=", 1)[1].strip()]
        key = str(image.relative_to(root))
        pictures.append(Picture(_picture_id("tuxpaint", key), "tuxpaint", lines[0], image, translations,
                                image.stem.replace("_", "-")))
    return pictures


def _cldr(tree: Path, language: str) -> dict[str, tuple[str, list[str]]]:
    """CLDR annotations of one language: character(s) → (tts name, keywords)."""
    path = tree / CLDR / f"{language}.xml"
    out: dict[str, tuple[str, list[str]]] = {}
    if not path.exists():
        return out
    import xml.etree.ElementTree as ET

    for node in ET.parse(path).getroot().iter("annotation"):
        cp, text = node.get("cp"), (node.text or "").strip()
        if not cp or not text:
            continue
        name, keywords = out.get(cp, ("", []))
        if node.get("type") == "tts":
            name = text
        else:
            keywords = [k.strip() for k in text.split("|") if k.strip()]
        out[cp] = (name, keywords)
    return out


def _draw_glyph(font: ImageFont.FreeTypeFont, text: str, colour: bool, canvas: int = 160) -> Image.Image | None:
    """The glyph scaled into a transparent square canvas, or None where the font has no glyph for it."""
    layer = Image.new("RGBA", (canvas * 2, canvas * 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.text((canvas, canvas), text, font=font, anchor="mm", embedded_color=colour, fill=(0, 0, 0, 255))
    box = layer.getbbox()
    if box is None:
        return None
    glyph = layer.crop(box)
    scale = 0.8 * canvas / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    out = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    out.paste(glyph, ((canvas - glyph.width) // 2, (canvas - glyph.height) // 2))
    return out


def emoji_pictures(tree: Path, staging: Path) -> list[Picture]:
    """Fully-qualified emoji without skin-tone variants, drawn from Noto Color Emoji's bitmaps."""
    font = ImageFont.truetype(str(tree / NOTO), 109)
    english = _cldr(tree, "en")
    others = {lang: _cldr(tree, lang) for lang in TRANSLATION_LANGUAGES}
    pictures = []
    folder = staging / "emoji"
    folder.mkdir(parents=True, exist_ok=True)
    for line in (tree / EMOJI_TEST).read_text("utf-8").splitlines():
        if "; fully-qualified" not in line or "skin tone" in line:
            continue
        parts = line.split("#", 1)[1].strip().split(" ", 2)  # "😀 E1.0 grinning face"
        if len(parts) < 3:
            continue
        chars, name = parts[0], parts[2].strip()
        key = chars.replace("\ufe0f", "")
        path = folder / f"{'-'.join(f'{ord(c):x}' for c in chars)}.png"
        if not path.exists():
            image = _draw_glyph(font, chars, colour=True)
            if image is None:
                continue
            image.save(path)
        keywords = [k for k in english.get(key, english.get(chars, ("", [])))[1] if k.lower() != name.lower()]
        translations = [others[lang][k][0] for lang in others for k in (key, chars) if others[lang].get(k, ("",))[0]]
        pictures.append(Picture(_picture_id("emoji", chars), "emoji", name, path, translations[:6],
                                name.replace(" ", "_").replace(":", "")[:24]))
        pictures[-1].caption = _emoji_caption(name, keywords, int(pictures[-1].id, 16))
    return pictures


def _emoji_caption(name: str, keywords: list[str], salt: int) -> str:
    """Alt-text as sites write it for an emoji: its name, sometimes with its keywords."""
    if keywords and salt % 2:
        return f"{name} ({', '.join(keywords[:4])})"
    return f"{name} emoji" if salt % 3 == 0 else name


def _missing_glyph(font: ImageFont.FreeTypeFont) -> bytes | None:
    """The drawing of a private-use code point: the font's .notdef box, what a missing glyph looks like."""
    image = _draw_glyph(font, "\ue000", colour=False)
    return image.tobytes() if image is not None else None


def symbola_pictures(tree: Path, staging: Path) -> list[Picture]:
    """Symbola's black glyphs of pictographic symbols: line art, captioned with the CLDR or Unicode name."""
    font = ImageFont.truetype(str(tree / SYMBOLA), 120)
    notdef = _missing_glyph(font)
    english = _cldr(tree, "en")
    others = {lang: _cldr(tree, lang) for lang in TRANSLATION_LANGUAGES}
    folder = staging / "symbola"
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for line in (tree / UNICODE_DATA).read_text("utf-8").splitlines():
        fields = line.split(";")
        code = int(fields[0], 16)
        if not any(lo <= code <= hi for lo, hi in SYMBOL_BLOCKS) or fields[1].startswith("<"):
            continue
        char = chr(code)
        path = folder / f"{code:x}.png"
        if not path.exists():
            image = _draw_glyph(font, char, colour=False)
            if image is None or image.tobytes() == notdef:
                continue
            image.save(path)
        name = english.get(char, ("", []))[0] or fields[1].lower()
        translations = [others[lang][char][0] for lang in others if others[lang].get(char, ("",))[0]]
        pictures.append(Picture(_picture_id("symbola", char), "symbola", name, path, translations[:6],
                                name.replace(" ", "_")[:24]))
    return pictures


SOURCES = {"tuxpaint": tuxpaint_pictures, "emoji": emoji_pictures, "symbola": symbola_pictures}


def _normalised(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The drawn part of a picture, padded to a square: 48 × 48 grey, 8 × 8 RGB and its aspect ratio."""
    with Image.open(path) as opened:
        rgba = opened.convert("RGBA")
    box = rgba.getchannel("A").getbbox() or (0, 0, *rgba.size)
    drawn = flatten(rgba.crop(box))
    side = max(drawn.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(drawn, ((side - drawn.width) // 2, (side - drawn.height) // 2))
    grey = np.asarray(square.convert("L").resize((48, 48), Image.Resampling.BOX), dtype=np.int16)
    colour = np.asarray(square.resize((8, 8), Image.Resampling.BOX), dtype=np.int16)
    return grey, colour, drawn.width / drawn.height


def merge_identical(pictures: list[Picture]) -> list[Picture]:
    """One picture of each set that looks the same: the packages hold natural copies, and fonts draw some code
    points with one glyph (vertical bars, quotation marks, circles of several sizes, which are drawn at one size
    here). Two pictures are the same when their drawn parts, padded to squares, agree nearly pixel for pixel (mean
    grey difference under 2 of 255, no 8 × 8 colour cell off by 16) at the same aspect ratio; the first is kept, so
    the truth never calls two copies of one drawing different pictures."""
    features = [_normalised(p.image) for p in pictures]
    grey = np.stack([f[0] for f in features]).reshape(len(pictures), -1)
    coarse = grey.reshape(len(pictures), 8, 6, 8, 6).mean(axis=(2, 4)).reshape(len(pictures), -1)
    kept: list[int] = []
    for i in range(len(pictures)):
        same = False
        if kept:
            others = np.asarray(kept)
            near = others[np.abs(coarse[others] - coarse[i]).max(axis=1) <= 24]  # cheap first cut
            for j in near.tolist():
                if abs(features[i][2] / features[j][2] - 1) < 0.04 and \
                        np.abs(grey[i] - grey[j]).mean() < 2 and np.abs(features[i][1] - features[j][1]).max() <= 16:
                    same = True
                    break
        if not same:
            kept.append(i)
    return [pictures[i] for i in kept]


def flatten(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        flatten(image).save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def near_copy(image: Image.Image, variant: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A near copy of a picture as the web makes them: (bytes, file extension)."""
    if variant in ("jpeg_q40", "jpeg_q75", "png_to_jpeg"):
        return _encode(image, "JPEG", {"jpeg_q40": 40, "jpeg_q75": 75, "png_to_jpeg": 90}[variant]), "jpg"
    if variant == "half_size":
        half = image.resize((max(8, image.width // 2), max(8, image.height // 2)), Image.Resampling.BILINEAR)
        return _encode(half, "JPEG", 90), "jpg"
    if variant == "crop":  # 5-10% off each side, drawn per side
        w, h = image.size
        cuts = rng.uniform(0.05, 0.10, size=4)
        box = (round(cuts[0] * w), round(cuts[1] * h), w - round(cuts[2] * w), h - round(cuts[3] * h))
        return _encode(image.crop(box), "PNG"), "png"
    if variant == "brightness":
        flat = flatten(image)
        factor = float(rng.choice([0.92, 1.08]))
        return _encode(ImageEnhance.Brightness(flat).enhance(factor), "JPEG", 90), "jpg"
    if variant == "recolour":  # a warm or cool cast and a little more or less saturation
        flat = np.asarray(flatten(image), dtype=np.float32)
        cast = np.array(rng.choice([[1.06, 1.0, 0.92], [0.92, 1.0, 1.06]]), dtype=np.float32)
        shifted = Image.fromarray(np.clip(flat * cast, 0, 255).astype(np.uint8))
        return _encode(ImageEnhance.Color(shifted).enhance(float(rng.uniform(0.85, 1.15))), "JPEG", 90), "jpg"
    if variant == "mirror":
        return _encode(ImageOps.mirror(image), "PNG"), "png"
    if variant == "border":
        flat = flatten(image)
        width = max(2, round(float(rng.uniform(0.05, 0.12)) * max(flat.size)))
        colour = tuple(int(c) for c in rng.choice([[255, 255, 255], [0, 0, 0], [200, 200, 200], [30, 60, 140]]))
        return _encode(ImageOps.expand(flat, border=width, fill=colour), "JPEG", 90), "jpg"
    raise ValueError(f"unknown variant {variant!r}")


def near_blank(rng: np.random.Generator, like: Image.Image | None) -> tuple[bytes, str]:
    """An image that shows nothing: fully transparent, one flat colour, a white page with a speck, or a picture
    faded to a ghost."""
    side = int(rng.integers(96, 320))
    choice = int(rng.integers(4 if like is not None else 3))
    if choice == 0:
        return _encode(Image.new("RGBA", (side, side), (0, 0, 0, 0)), "PNG"), "png"
    if choice == 1:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        return _encode(Image.new("RGBA", (side, side), (*colour, 255)), "JPEG", 85), "jpg"
    if choice == 2:
        page = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        x, y = (int(v) for v in rng.integers(0, side - 4, size=2))
        ImageDraw.Draw(page).ellipse((x, y, x + 3, y + 3), fill=(120, 120, 120, 255))
        return _encode(page, "JPEG", 85), "jpg"
    ghost = like.convert("RGBA")  # type: ignore[union-attr]
    ghost.putalpha(ghost.getchannel("A").point(lambda a: a * 6 // 255))
    return _encode(ghost, "PNG"), "png"


def _junk(rng: np.random.Generator, stem: str) -> str:
    template = JUNK[int(rng.integers(len(JUNK)))]
    return template.format(n=int(rng.integers(1, 99999)), stem=stem or "img")


def _split_eval(pictures: list[Picture], share: float, seed: int) -> tuple[list[Picture], list[Picture]]:
    rng = np.random.default_rng([seed, 7])
    held = rng.random(len(pictures)) < share
    return [p for p, h in zip(pictures, held) if not h], [p for p, h in zip(pictures, held) if h]


def plan_rows(pictures: list[Picture], seed: int) -> list[tuple[str, Picture, dict]]:
    """(kind, picture, details) for every row, in a seeded order: one row per picture (its caption possibly
    noised), and the extra rows (copies, near-blank images, download faults) spread through the pool, each copy
    after its picture's own row."""
    rng = np.random.default_rng([seed, 1])
    n = len(pictures)
    noise = rng.choice([*CAPTION_NOISE, "clean"], size=n,
                       p=[*CAPTION_NOISE.values(), 1 - sum(CAPTION_NOISE.values())])
    order = rng.permutation(n)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    planned: list[tuple[float, str, Picture, dict]] = []
    for i, (picture, kind) in enumerate(zip(pictures, noise)):
        if kind == "translated" and not picture.translations:
            kind = "shuffled"
        planned.append((float(position[i]), str(kind), picture, {}))

    def after(i: int) -> float:
        return float(rng.uniform(position[i] + 0.5, n))

    for i in rng.choice(n, size=round(NEAR_SOURCES * n), replace=False):
        for variant in rng.choice(NEAR_VARIANTS, size=int(rng.integers(1, MAX_VARIANTS + 1)), replace=False):
            planned.append((after(i), "near_duplicate", pictures[i], {"variant": str(variant)}))
    for kind, share in {**EXTRA_ROWS, **FAULTS}.items():
        for i in rng.integers(0, n, size=max(1, round(share * n))):
            planned.append((after(int(i)), kind, pictures[int(i)], {}))
    planned.sort(key=lambda item: item[0])
    return [(kind, picture, details) for _, kind, picture, details in planned]


def build_pool(pictures: list[Picture], out: Path, seed: int = 0, eval_share: float = 0.12) -> dict:
    """Writes files/, pool.parquet, truth.parquet, eval/ and pool.json under ``out``; returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from curate.demo.pool import bomb_png

    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    pool_pictures, eval_pictures = _split_eval(pictures, eval_share, seed)
    rng = np.random.default_rng([seed, 2])
    captions = [p.caption for p in pool_pictures]
    own_row: dict[str, Row] = {}  # the first row of each picture: what copies copy
    rows: list[Row] = []
    for number, (kind, picture, details) in enumerate(plan_rows(pool_pictures, seed)):
        stem = f"{number:06d}"
        with Image.open(picture.image) as opened:
            image = opened.convert("RGBA")
        true = picture.caption
        if kind in ("clean", "shuffled", "translated", "junk", "boilerplate"):
            caption, ok = true, True
            if kind == "shuffled":
                caption = captions[int(rng.integers(len(captions)))]
                ok = caption == true
            elif kind == "translated":
                caption, ok = picture.translations[int(rng.integers(len(picture.translations)))], False
            elif kind == "junk":
                caption, ok = _junk(rng, picture.stem), False
            elif kind == "boilerplate":
                caption, ok = BOILERPLATE[int(rng.integers(len(BOILERPLATE)))], False
            source_bytes = picture.image.read_bytes()
            ext = "png"
            if picture.source != "tuxpaint" and rng.random() < 0.3:  # some pages serve the glyph flattened
                source_bytes, ext = _encode(image, "JPEG", 92), "jpg"
            name = f"{stem}.{ext}"
            (files / name).write_bytes(source_bytes)
            row = Row(name, "img", caption, kind, picture.id, picture.source, ok, true_caption=true)
            own_row.setdefault(picture.id, row)
        elif kind in ("exact_duplicate", "near_duplicate"):
            original = own_row[picture.id]  # planted before its copies
            if kind == "exact_duplicate":
                name = f"{stem}{Path(original.name).suffix}"
                (files / name).write_bytes((files / original.name).read_bytes())
            else:
                data, ext = near_copy(image, details["variant"], rng)
                name = f"{stem}.{ext}"
                (files / name).write_bytes(data)
            row = Row(name, "img", original.caption, kind, picture.id, picture.source, original.caption_ok,
                      details.get("variant"), true)
        elif kind == "near_blank":
            data, ext = near_blank(rng, image)
            name = f"{stem}.{ext}"
            (files / name).write_bytes(data)
            row = Row(name, "img", true, kind, None, picture.source, False, true_caption=true)
        else:  # a download fault: its picture's caption, bytes that never arrive whole
            name = f"{stem}.{'png' if kind == 'bomb' else 'jpg'}"
            if kind == "truncated":
                data = _encode(image, "JPEG", 90)
                (files / name).write_bytes(data[: len(data) // 2])
            elif kind == "not_an_image":
                (files / name).write_bytes(b"<!doctype html><title>Not found</title><h1>404</h1>\n")
            elif kind == "bomb":
                (files / name).write_bytes(bomb_png())
            elif kind in ("flaky", "redirect", "slow"):
                (files / name).write_bytes(picture.image.read_bytes())
            row = Row(name, FAULT_ROUTE.get(kind, "img"), true, kind, picture.id, picture.source, True,
                      true_caption=true)
        rows.append(row)
    columns = {key: [getattr(r, key) for r in rows] for key in ("name", "route", "caption")}
    pq.write_table(pa.table(columns), out / "pool.parquet")
    truth = {"row": list(range(len(rows))), **{key: [getattr(r, key) for r in rows] for key in
                                                 ("name", "kind", "picture", "source", "caption_ok", "variant",
                                                  "true_caption")}}
    pq.write_table(pa.table(truth), out / "truth.parquet")
    write_eval_set(eval_pictures, out / "eval")
    summary = {"seed": seed, "pictures": len(pictures), "pool_pictures": len(pool_pictures),
               "eval_pictures": len(eval_pictures), "rows": len(rows),
               "sources": dict(Counter(r.source for r in rows)), "kinds": dict(Counter(r.kind for r in rows)),
               "variants": dict(Counter(r.variant for r in rows if r.variant)),
               "shares": {"caption_noise": CAPTION_NOISE, "extra_rows": EXTRA_ROWS, "faults": FAULTS}}
    (out / "pool.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_eval_set(pictures: list[Picture], folder: Path) -> Path:
    """The held-out pictures with their true captions, as curate eval and curate experiment read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "files").mkdir(parents=True, exist_ok=True)
    names = []
    for i, picture in enumerate(pictures):
        name = f"{i:05d}.png"
        (folder / "files" / name).write_bytes(picture.image.read_bytes())
        names.append(f"files/{name}")
    path = folder / "eval.parquet"
    pq.write_table(pa.table({"image_path": names, "caption": [p.caption for p in pictures],
                             "picture": [p.id for p in pictures], "source": [p.source for p in pictures]}), path)
    return path


def collect(tree: Path, staging: Path, sources: list[str]) -> list[Picture]:
    pictures: list[Picture] = []
    for name in sources:
        found = SOURCES[name](tree, staging)
        print(f"realpool: {len(found)} pictures from {name}", file=sys.stderr)
        pictures.extend(found)
    return merge_identical(pictures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pool folder (replaced)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "curate-realpool",
                        help="downloaded and unpacked packages, and the drawn glyphs")
    parser.add_argument("--tree", type=Path, default=None, help="an unpacked package tree to use instead of fetching")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-share", type=float, default=0.12, help="pictures held out as the clean eval set")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pictures (a quick pool)")
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        parser.error(f"--sources: unknown {', '.join(unknown)}; expected some of {', '.join(SOURCES)}")
    tree = args.tree or fetch(args.cache)
    pictures = collect(tree, args.cache / "staging", sources)
    if args.limit:
        order = np.random.default_rng([args.seed, 9]).permutation(len(pictures))[: args.limit]
        pictures = [pictures[i] for i in sorted(order)]
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    summary = build_pool(pictures, args.out, args.seed, args.eval_share)
    print(json.dumps({k: summary[k] for k in ("pictures", "eval_pictures", "rows", "sources", "kinds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
