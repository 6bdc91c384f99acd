"""Dedup tiers: planted near-duplicates are found, lookalikes are not merged, and the decisions keep their promises
(idempotent, complete, pointing at a kept row of the same group, independent of input order)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance

from curate.dedup.bands import brute_force_pairs, hamming, phash_pairs
from curate.demo.pool import _draw
from curate.stages.dedup_exact import DedupExact, DedupExactConfig
from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig
from curate.stages.hash import HashConfig, HashStage


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _variants(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    dx, dy = int(w * 0.025), int(h * 0.025)  # 5% of each side in all
    return {
        "jpeg_q40": _encode(img, quality=40),
        "half_size": _encode(img.resize((w // 2, h // 2), Image.Resampling.BILINEAR), quality=90),
        "crop_5pct": _encode(img.crop((dx, dy, w - dx, h - dy)), quality=90),
        "brighter": _encode(ImageEnhance.Brightness(img).enhance(1.08), quality=90),
        "as_png": _encode(img, "PNG"),
    }


def _hashed(images: dict[str, bytes]) -> pa.Table:
    """The hash stage's columns for named images, plus the sha256 and sizes the download stage would store."""
    import hashlib

    names = list(images)
    batch = pa.table({"uid": names, "status": ["ok"] * len(names), "reason": pa.nulls(len(names), pa.string()),
                      "image": [images[n] for n in names]})
    out = HashStage(HashConfig()).process(batch)
    assert out.column("status").to_pylist() == ["ok"] * len(names)
    sizes = [Image.open(io.BytesIO(images[n])).size for n in names]
    return out.append_column("sha256", pa.array([hashlib.sha256(images[n]).hexdigest() for n in names])) \
        .append_column("original_width", pa.array([s[0] for s in sizes], pa.int32())) \
        .append_column("original_height", pa.array([s[1] for s in sizes], pa.int32()))


def _removed(stage, table: pa.Table) -> dict[str, str]:
    out = stage.decide(table.select(["uid", *stage.inputs(),
                                     *[c for c in stage.optional_inputs() if c in table.column_names]])).table
    return dict(zip(out.column("uid").to_pylist(), out.column("duplicate_of").to_pylist()))


@pytest.fixture(scope="module")
def planted() -> pa.Table:
    rng = np.random.default_rng(11)
    images: dict[str, bytes] = {}
    for k, (shape, colour, other, bg) in enumerate([("star", "red", "green", "white"),
                                                     ("circle", "blue", "orange", "yellow"),
                                                     ("triangle", "purple", "green", "black")]):
        scene = np.random.default_rng([11, k])
        original, _ = _draw(scene, 640, 480, shape, colour, bg)
        lookalike, _ = _draw(np.random.default_rng([11, k]), 640, 480, shape, other, bg)  # same layout
        images[f"o{k}"] = _encode(original, quality=95)
        images[f"look{k}"] = _encode(lookalike, quality=95)
        for name, data in _variants(original).items():
            images[f"o{k}_{name}"] = data
    del rng
    return _hashed(images)


def test_planted_near_duplicates_are_found_and_lookalikes_kept(planted) -> None:
    """Re-encodes, resizes, brightness and format changes by pHash. (Crops are the semantic tier's: one 5% crop
    here moves the pHash by 16 bits.)"""
    crops = [u for u in planted.column("uid").to_pylist() if u.endswith("crop_5pct")]
    planted = planted.filter(pa.compute.invert(pa.compute.is_in(planted.column("uid"), value_set=pa.array(crops))))
    removed = _removed(DedupPhash(DedupPhashConfig()), planted)
    for k in range(3):
        group = {f"o{k}"} | {u for u in planted.column("uid").to_pylist() if u.startswith(f"o{k}_")}
        survivor = [u for u in group if u not in removed]
        assert len(survivor) == 1, (k, sorted(group - set(removed)))
        assert all(removed[u] == survivor[0] for u in group - set(survivor))
        assert f"look{k}" not in removed and f"look{k}" not in removed.values()  # same shape, other colour
    # the keep policy: the larger original survives its half-size copy
    assert "o0_half_size" in removed


def test_the_same_pixels_rewrapped_are_exact_duplicates(planted) -> None:
    img = Image.open(io.BytesIO(dict(zip(planted.column("uid").to_pylist(),
                                         planted.column("image").to_pylist()))["o1_as_png"]))
    bmp, webp = _encode(img, "BMP"), _encode(img, "WEBP", lossless=True)
    table = _hashed({"png": _encode(img, "PNG"), "bmp": bmp, "webp": webp, "png_again": _encode(img, "PNG")})
    removed = _removed(DedupExact(DedupExactConfig()), table)
    assert len(removed) == 3 and len(set(removed.values())) == 1
    bytes_only = _removed(DedupExact(DedupExactConfig(pixels=False)), table)
    assert len(bytes_only) == 1  # only the byte-identical PNG


def test_banding_finds_what_brute_force_finds() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-2**63, 2**63 - 1, size=3000, dtype=np.int64)
    planted = codes[:300].copy().view(np.uint64)
    for i in range(300):  # each within 0..8 bits of a random code
        for bit in rng.choice(64, size=int(rng.integers(0, 9)), replace=False):
            planted[i] ^= np.uint64(1) << np.uint64(int(bit))
    codes = np.concatenate([codes, planted.view(np.int64), codes[:5]])  # plus five exact repeats
    left, right = phash_pairs(codes, radius=8)
    found = set(zip(left.tolist(), right.tolist()))
    truth = brute_force_pairs(codes, 8)
    assert found <= truth  # every reported pair is within the radius
    assert len(found & truth) >= 0.95 * len(truth), (len(found), len(truth))
    assert np.all(hamming(codes[left], codes[right]) <= 8)


def _code_table(codes: list[int], sizes: list[int], scores: list[float]) -> pa.Table:
    n = len(codes)
    grid = bytes(48)  # one colour grid for all: the pHash alone decides
    return pa.table({"uid": [f"{i:04d}" for i in range(n)], "phash": pa.array(codes, pa.int64()),
                     "color_signature": [grid] * n, "clip_score": pa.array(scores, pa.float32()),
                     "original_width": pa.array(sizes, pa.int32()), "original_height": pa.array(sizes, pa.int32())})


@st.composite
def code_sets(draw):
    """Up to 40 codes drawn around a few centres (1-10 bits away) so groups form, with sizes and tied scores."""
    centres = draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=5))
    codes = []
    for _ in range(draw(st.integers(1, 40))):
        code = draw(st.sampled_from(centres)) & (2**64 - 1)
        for bit in draw(st.lists(st.integers(0, 63), max_size=10)):
            code ^= 1 << bit
        codes.append(code - 2**64 if code >= 2**63 else code)
    n = len(codes)
    sizes = draw(st.lists(st.integers(10, 13), min_size=n, max_size=n))
    scores = draw(st.lists(st.sampled_from([0.1, 0.2, 0.3]), min_size=n, max_size=n))
    return codes, sizes, scores


@settings(max_examples=60, deadline=None)
@given(code_sets(), st.randoms(use_true_random=False))
def test_phash_dedup_properties(data, random) -> None:
    table = _code_table(*data)
    stage = DedupPhash(DedupPhashConfig(radius=6))
    removed = _removed(stage, table)
    uids = table.column("uid").to_pylist()
    kept = set(uids) - set(removed)
    assert kept | set(removed) == set(uids) and not kept & set(removed)  # kept ∪ removed = input, disjoint
    codes = dict(zip(uids, table.column("phash").to_pylist()))
    scores = dict(zip(uids, table.column("clip_score").to_pylist()))
    for uid, target in removed.items():
        assert target in kept  # points at a survivor
        assert scores[target] >= scores[uid]  # the keep policy: the best score survives
    # the survivor is in the removed row's group: a chain of near pairs leads from one to the other
    left, right = phash_pairs(np.asarray(list(codes.values()), dtype=np.int64), radius=6)
    from curate.dedup.groups import groups_of

    labels = dict(zip(uids, groups_of(len(uids), left, right)))
    assert all(labels[u] == labels[t] for u, t in removed.items())
    # idempotent: the survivors hold no duplicates
    survivors = table.filter(pa.compute.is_in(table.column("uid"), value_set=pa.array(sorted(kept))))
    assert _removed(stage, survivors) == {}
    # order-free: the same decisions whatever order the rows come in
    order = list(range(table.num_rows))
    random.shuffle(order)
    assert _removed(stage, table.take(order)) == removed


def test_most_five_percent_crops_are_found_by_phash() -> None:
    """Over 40 drawn scenes: a 5% crop is usually within the radius (the rest is the semantic tier's)."""
    from curate.demo.pool import COLOURS, SHAPES

    rng = np.random.default_rng(5)
    images = {}
    for k in range(40):
        colour, bg = rng.choice(list(COLOURS), size=2, replace=False)
        img, _ = _draw(np.random.default_rng([5, k]), 480, 360, SHAPES[k % len(SHAPES)], str(colour), str(bg))
        images[f"o{k}"] = _encode(img, quality=95)
        images[f"o{k}_crop"] = _variants(img)["crop_5pct"]
    removed = _removed(DedupPhash(DedupPhashConfig()), _hashed(images))
    found = sum(1 for k in range(40) if removed.get(f"o{k}_crop") == f"o{k}" or removed.get(f"o{k}") == f"o{k}_crop")
    print(f"5% crops found by the pHash tier: {found}/40")
    assert found >= 32
    assert all(a.split("_")[0] == b.split("_")[0] for a, b in removed.items())  # never across scenes


def _embedded(vectors: np.ndarray, models: list[str]) -> pa.Table:
    n = len(vectors)
    return pa.table({"uid": [f"{i:05d}" for i in range(n)],
                     "image_embedding": pa.array([v.astype(np.float16).tolist() for v in vectors],
                                                 pa.list_(pa.float16())),
                     "clip_model": models, "clip_score": pa.array(np.linspace(0, 1, n), pa.float32())})


def test_semantic_tier_groups_near_directions_per_model() -> None:
    from curate.stages.dedup_semantic import DedupSemantic, DedupSemanticConfig

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 64))
    near = base[:50] + rng.normal(scale=0.05, size=(50, 64))  # cosine ~0.999 to their base rows
    vectors = np.concatenate([base, near])
    models = ["a"] * 250
    stage = DedupSemantic(DedupSemanticConfig(threshold=0.95, clusters=4))
    removed = _removed(stage, _embedded(vectors, models))
    pairs = {frozenset((u, t)) for u, t in removed.items()}
    planted = {frozenset((f"{i:05d}", f"{200 + i:05d}")) for i in range(50)}
    assert len(pairs & planted) >= 48 and pairs <= planted  # across 4 k-means clusters, at most a rare split
    # the keep policy: the higher clip_score (the later row here) survives
    assert all(int(t) > int(u) for u, t in removed.items())
    # embeddings of different models are never compared
    split = _removed(stage, _embedded(vectors, ["a"] * 200 + ["b"] * 50))
    assert split == {}


def test_rows_of_one_phash_in_two_colours_group_by_colour() -> None:
    """A red and two blue images share a pHash (pHash sees no hue), a third blue one is a bit away: the blues are
    one group whichever row the search kept for the shared code, and the red stays apart."""
    red, blue = bytes([200, 0, 0] * 16), bytes([0, 0, 200] * 16)
    table = pa.table({"uid": ["r0", "b1", "b2", "b3"], "phash": pa.array([5, 5, 4, 5], pa.int64()),
                      "color_signature": [red, blue, blue, blue],
                      "clip_score": pa.array([0.9, 0.5, 0.8, 0.1], pa.float32())})
    stage = DedupPhash(DedupPhashConfig())
    assert _removed(stage, table) == {"b1": "b2", "b3": "b2"}
    assert _removed(stage, table.take([3, 2, 1, 0])) == {"b1": "b2", "b3": "b2"}


def _line_art(kind: str, size: int = 400) -> Image.Image:
    """Near-white line art as clip-art sites serve it: a small drawing in thin strokes on a transparent page."""
    from PIL import ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    c, r = size // 2, size // 4
    if kind == "house":
        draw.polygon([(c - r, c), (c, c - r), (c + r, c)], outline=(0, 0, 0, 255), width=6)
        draw.rectangle((c - r + 10, c, c + r - 10, c + r), outline=(0, 0, 0, 255), width=6)
        draw.rectangle((c - 8, c + r - 30, c + 8, c + r), outline=(0, 0, 0, 255), width=6)
    elif kind == "cup":
        draw.arc((c - r, c - r, c + r, c + r), 0, 180, fill=(0, 0, 0, 255), width=6)
        draw.line((c - r, c, c + r, c), fill=(0, 0, 0, 255), width=6)
        draw.arc((c + r - 12, c - 4, c + r + 22, c + 34), 270, 90, fill=(0, 0, 0, 255), width=6)
    else:  # a bicycle: two wheels and a frame
        draw.ellipse((c - r - 10, c, c - 10, c + r), outline=(0, 0, 0, 255), width=6)
        draw.ellipse((c + 10, c, c + r + 10, c + r), outline=(0, 0, 0, 255), width=6)
        draw.line((c - r // 2 - 10, c + r // 2, c, c - 10, c + r // 2 + 10, c + r // 2), fill=(0, 0, 0, 255), width=6)
    return image


def _as_stored(images: dict[str, bytes]) -> dict[str, bytes]:
    """The images as the download stage stores them (alpha flattened on white, 128 px, border mode, JPEG)."""
    from curate.stages.download.imaging import ResizeSpec, decode_and_resize

    spec = ResizeSpec(image_size=128, resize_mode="border", output_format="jpg", encode_quality=90)
    return {name: decode_and_resize(data, spec).data for name, data in images.items()}


def test_line_art_its_crop_and_its_reencode_are_one_group_and_other_drawings_stay() -> None:
    """The development pool's quirk, made small: near-white line art, where the DCT signs of a roughly symmetric
    drawing flip under a re-encode and a crop moves the whole-image hash far. The content fingerprints (the mean
    hash of the content box above all) find the copies; the second check keeps the different drawings apart."""
    images = {}
    for kind in ("house", "cup", "bicycle"):
        art = _line_art(kind)
        flat = Image.new("RGB", art.size, "white")
        flat.paste(art, mask=art.getchannel("A"))
        w, h = art.size
        images[kind] = _encode(art, "PNG")
        images[f"{kind}_crop"] = _encode(art.crop((int(0.07 * w), int(0.05 * h), w - int(0.09 * w),
                                                   h - int(0.06 * h))), "PNG")
        images[f"{kind}_q75"] = _encode(flat, quality=75)
    stored = _as_stored(images)
    table = _hashed(stored)
    removed = _removed(DedupExact(DedupExactConfig()), table)
    live = table.filter(pa.compute.invert(pa.compute.is_in(table.column("uid"), value_set=pa.array(list(removed), pa.string()))))
    removed |= _removed(DedupPhash(DedupPhashConfig()), live)
    for kind in ("house", "cup", "bicycle"):
        group = {kind, f"{kind}_crop", f"{kind}_q75"}
        survivors = group - set(removed)
        assert len(survivors) == 1, (kind, survivors)
        assert all(removed[u] in group for u in group & set(removed))  # never pointing at another drawing
    assert len(removed) == 6


def test_a_code_shared_with_an_unrelated_drawing_still_pairs_the_copies() -> None:
    """Two copies and an unrelated drawing share a content code: the second check turns the unrelated one away, and
    the copies must still be compared with each other, whichever row the input lists first."""
    rng = np.random.default_rng(3)
    copy = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    unrelated = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    far = [int(c) for c in rng.integers(-2**62, 2**62, 3)]  # whole-image codes nowhere near each other
    table = pa.table({
        "uid": ["u0", "u1", "u2"], "phash": pa.array(far, pa.int64()),
        "content_phash": pa.array([[0x0F0F_3C3C_5A5A_A5A5, None, None, None, None]] * 3, pa.list_(pa.int64())),
        "content_thumbnail": [unrelated.tobytes(), copy.tobytes(), copy.tobytes()],
        "content_colors": [bytes([90] * 192)] * 3, "color_signature": [bytes([90] * 48)] * 3,
        "clip_score": pa.array([0.9, 0.5, 0.8], pa.float32())})
    stage = DedupPhash(DedupPhashConfig())
    for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        assert _removed(stage, table.take(order)) == {"u1": "u2"}


def test_content_codes_keep_all_64_bits_next_to_blank_views() -> None:
    """Two copies whose content codes are one bit apart, with blank views (nulls) beside them: the codes must reach
    the search as they are (as floats, 0x0FFF...FF rounds to 0x1000...00 and the pair ends ~40 bits apart)."""
    thumbnail = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1)).tobytes()
    code = 0x0FFF_FFFF_FFFF_FFFF
    table = pa.table({
        "uid": ["a", "b"], "phash": pa.array([0x5555_5555_5555_5555, ~0x5555_5555_5555_5555], pa.int64()),
        "content_phash": pa.array([[code, None, None, None, None], [code ^ (1 << 20), None, None, None, None]],
                                  pa.list_(pa.int64())),
        "content_thumbnail": [thumbnail] * 2, "content_colors": [bytes([90] * 192)] * 2,
        "color_signature": [bytes([90] * 48)] * 2, "clip_score": pa.array([0.9, 0.5], pa.float32())})
    assert _removed(DedupPhash(DedupPhashConfig()), table) == {"b": "a"}


def test_parts_hashed_before_the_content_fingerprints_take_the_whole_image_path(planted, tmp_path) -> None:
    """A resumed run keeps parts hashed before the content columns existed: the tier decides the whole pool by its
    whole-image pHashes (the copies in the old part are still found) instead of failing on the missing columns."""
    import pyarrow.parquet as pq

    from curate.core.fan_out import in_process
    from curate.core.pool import Pool

    table = planted.append_column("row", pa.array(np.arange(planted.num_rows), pa.int64()))
    uids = table.column("uid").to_pylist()
    new = table.take([uids.index(u) for u in ("o0", "look0", "o1")])
    old = table.take([uids.index(u) for u in ("o0_as_png", "o1_jpeg_q40")]).drop_columns(
        ["content_phash", "content_thumbnail", "content_colors", "content_fraction"])
    pq.write_table(new, tmp_path / "000.parquet")
    pq.write_table(old, tmp_path / "001.parquet")
    pool = Pool.from_parts([tmp_path / "000.parquet", tmp_path / "001.parquet"])
    assert pool.has("content_thumbnail") and not pool.has_everywhere("content_thumbnail")
    with in_process():
        decided = DedupPhash(DedupPhashConfig()).decide_pool(pool).table
    groups = [{u, d} for u, d in zip(decided.column("uid").to_pylist(), decided.column("duplicate_of").to_pylist())]
    assert sorted(map(sorted, groups)) == [["o0", "o0_as_png"], ["o1", "o1_jpeg_q40"]]


def _flag(stars: str, size: tuple[int, int] = (480, 320)) -> Image.Image:
    """A flag with a crossed canton and, on the fly, either a ring of twelve small stars or four large ones: two
    designs as alike as the development pool's look-alike flags (New Zealand and the Cook Islands)."""
    from PIL import ImageDraw

    image = Image.new("RGB", size, (20, 40, 140))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.line((0, 0, w // 2, h // 2), fill="white", width=14)
    draw.line((0, h // 2, w // 2, 0), fill="white", width=14)
    draw.line((w // 4, 0, w // 4, h // 2), fill=(200, 20, 40), width=12)
    draw.line((0, h // 4, w // 2, h // 4), fill=(200, 20, 40), width=12)
    cx, cy = 3 * w // 4, h // 2
    if stars == "ring":
        for k in range(12):
            x, y = cx + 70 * np.cos(2 * np.pi * k / 12), cy + 70 * np.sin(2 * np.pi * k / 12)
            draw.ellipse((x - 8, y - 8, x + 8, y + 8), fill="white")
    else:
        for x, y in ((cx, cy - 70), (cx - 60, cy), (cx + 60, cy - 10), (cx, cy + 70)):
            draw.ellipse((x - 14, y - 14, x + 14, y + 14), fill=(220, 30, 40), outline="white", width=4)
    return image


def test_look_alike_designs_stay_apart_while_their_half_size_copies_join_them() -> None:
    """Two flags that differ only in the stars on the fly: at 16 px the second check saw one flag and merged all six
    rows; the 32 px thumbnail, compared in 4 × 4 pixel blocks, keeps the designs apart and still joins each one's
    half-size and JPEG q40 copies to it."""
    images = {}
    for kind in ("ring", "four"):
        flag = _flag(kind)
        w, h = flag.size
        images[kind] = _encode(flag, "PNG")
        images[f"{kind}_half"] = _encode(flag.resize((w // 2, h // 2), Image.Resampling.BILINEAR), quality=90)
        images[f"{kind}_q40"] = _encode(flag, quality=40)
    table = _hashed(_as_stored(images))
    removed = _removed(DedupPhash(DedupPhashConfig()), table)
    assert removed == {"ring_half": "ring", "ring_q40": "ring", "four_half": "four", "four_q40": "four"}


def test_thumbnails_stored_at_16_px_by_earlier_runs_are_still_compared() -> None:
    """A resumed run may hold parts hashed when thumbnails were 16 × 16: they are read next to the 32 px ones
    at that detail, so a copy in an old part still joins its original in a new one."""
    from curate.dedup.fingerprints import THUMBNAIL, content_thumbnails

    table = _hashed(_as_stored({"ring": _encode(_flag("ring"), "PNG"), "copy": _encode(_flag("ring"), quality=60)}))
    new = table.column("content_thumbnail").to_pylist()
    assert {len(blob) for blob in new} == {THUMBNAIL ** 2}
    small = Image.frombytes("L", (THUMBNAIL, THUMBNAIL), new[1]).resize((16, 16), Image.Resampling.BOX).tobytes()
    mixed, old = content_thumbnails([new[0], small])
    assert mixed.shape == (2, THUMBNAIL, THUMBNAIL) and old.tolist() == [False, True]
    old = table.set_column(table.column_names.index("content_thumbnail"), "content_thumbnail",
                           pa.array([new[0], small], pa.binary()))
    assert _removed(DedupPhash(DedupPhashConfig()), table) == {"ring": "copy"}  # the smaller uid survives
    assert _removed(DedupPhash(DedupPhashConfig()), old) == {"ring": "copy"}
