"""Rule filters: each rule with rows on both sides of its boundary; the first failed rule names the reason, and each
rule counts every row it would reject on its own."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.stages.rules import RuleFilter, RulesConfig


def _decide(rows: list[tuple[str, int, int]], **rules) -> tuple[dict[str, str], dict[str, int]]:
    """rows: (caption, width, height); returns uid → reason of the removed rows, and the would-reject counts."""
    stage = RuleFilter(RulesConfig(**rules))
    table = pa.table({"uid": [f"r{i}" for i in range(len(rows))], "caption": [r[0] for r in rows],
                      "original_width": pa.array([r[1] for r in rows], pa.int32()),
                      "original_height": pa.array([r[2] for r in rows], pa.int32())})
    decided = stage.decide(table.select(["uid", *stage.inputs()]))
    out = decided.table
    assert set(out.column("status").to_pylist()) <= {"filtered"}
    return dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist())), decided.would_reject


def _kept(rows, **rules) -> list[str]:
    removed, _ = _decide(rows, **rules)
    return [rows[int(uid[1:])][0] for uid in sorted(set(f"r{i}" for i in range(len(rows))) - set(removed))]


@pytest.mark.parametrize("rules, kept, dropped, reason", [
    ({"min_words": 3}, "a red star", "red star", "rule:caption_too_short"),
    ({"max_words": 3}, "a red star", "a big red star", "rule:caption_too_long"),
    ({"min_chars": 5}, "a dog", "dog", "rule:caption_too_short"),
    ({"max_chars": 5}, "a dog", "a dogs", "rule:caption_too_long"),
    ({"min_letter_share": 0.5}, "abc 12", "ab 1234", "rule:caption_non_letters"),
    ({"languages": ["en"]}, "a small red star on a white background", "ein kleiner roter Stern auf weißem Grund",
     "rule:language"),
])
def test_caption_rules_on_both_sides_of_the_boundary(rules, kept, dropped, reason) -> None:
    removed, would = _decide([(kept, 100, 100), (dropped, 100, 100)], **rules)
    assert removed == {"r1": reason}
    assert would == {reason: 1}


@pytest.mark.parametrize("caption", ["IMG_1234.JPG", "DSC_0042", "photo 2019-05-01.png", "https://example.com/a.jpg",
                                     "www.example.com/cat", "untitled", "Image", "No description.", "!!!", "  "])
def test_junk_captions_are_recognised(caption) -> None:
    removed, _ = _decide([(caption, 100, 100), ("a photo of a cat on a sofa", 100, 100)], junk_captions=True)
    assert removed == {"r0": "rule:caption_junk"}


def test_junk_rule_takes_linear_time_on_hostile_captions() -> None:
    """Captions come from strangers: 200k characters that make a backtracking pattern try every split."""
    import time

    hostile = [" " * 200_000 + "x", "(" * 200_000 + "x", "img1" + "-" * 200_000 + " a dog", "http://" + "a" * 200_000 + " b",
               "  " + "a." * 100_000 + "png "]
    start = time.perf_counter()
    removed, _ = _decide([(c, 100, 100) for c in hostile], junk_captions=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.1f} s for {len(hostile)} captions"  # quadratic: about a minute each
    assert removed == {}  # none is a name: each is far longer than any file name


def test_image_rules_on_both_sides_of_the_boundary() -> None:
    rows = [("a", 100, 100), ("b", 99, 120), ("c", 300, 100), ("d", 301, 100)]
    removed, would = _decide(rows, min_image_side=100, max_aspect_ratio=3)
    assert removed == {"r1": "rule:image_too_small", "r3": "rule:aspect_ratio"}
    assert would == {"rule:image_too_small": 1, "rule:aspect_ratio": 1}


def test_short_captions_are_not_judged_by_language() -> None:
    assert _kept([("Hallo Welt", 100, 100)], languages=["en"]) == ["Hallo Welt"]


def test_the_first_failed_rule_is_the_reason_and_every_rule_counts() -> None:
    rows = [("IMG_1.jpg", 20, 20), ("a cat", 20, 20), ("a cat sitting on a red sofa", 200, 200)]
    removed, would = _decide(rows, min_words=3, junk_captions=True, min_image_side=32)
    assert removed == {"r0": "rule:caption_too_short", "r1": "rule:caption_too_short"}
    assert would == {"rule:caption_too_short": 2, "rule:caption_junk": 1, "rule:image_too_small": 2}


def _stored(image) -> bytes:
    """An image as the download stage stores it: alpha flattened on white, resized, re-encoded."""
    import io

    from curate.stages.download.imaging import ResizeSpec, decode_and_resize

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return decode_and_resize(buffer.getvalue(), ResizeSpec(image_size=128, resize_mode="border")).data


def test_images_that_show_nothing_are_low_information_and_line_art_is_not() -> None:
    """The development pool's quirk, made small: a transparent PNG flattens to a white page and passed every filter.
    A thin line drawing on white, the least ink a real picture has there, must stay."""
    from PIL import Image, ImageDraw

    from curate.stages.hash import HashConfig, HashStage

    transparent = Image.new("RGBA", (200, 150), (0, 0, 0, 0))
    flat = Image.new("RGB", (160, 160), (40, 90, 200))
    speck = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(speck).ellipse((100, 100, 103, 103), fill="grey")
    line_art = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # an outlined star, 2 px strokes, transparent around
    points = [(100 + 80 * __import__("math").cos(a * 0.6283 - 1.5708) * (1 if a % 2 == 0 else 0.4),
               100 + 80 * __import__("math").sin(a * 0.6283 - 1.5708) * (1 if a % 2 == 0 else 0.4)) for a in range(10)]
    ImageDraw.Draw(line_art).polygon(points, outline=(0, 0, 0, 255), width=2)
    names = ["transparent", "flat", "speck", "line_art"]
    images = [_stored(im) for im in (transparent, flat, speck, line_art)]
    batch = pa.table({"uid": names, "status": ["ok"] * 4, "reason": pa.nulls(4, pa.string()), "image": images})
    hashed = HashStage(HashConfig()).process(batch)
    stage = RuleFilter(RulesConfig(min_content_fraction=0.005))
    decided = stage.decide(hashed.append_column("caption", pa.array(["a star"] * 4)).select(["uid", *stage.inputs()]))
    out = decided.table
    assert dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist())) == {
        "transparent": "rule:low_information", "flat": "rule:low_information", "speck": "rule:low_information"}
    assert decided.would_reject == {"rule:low_information": 3}


def _captioned(captions: list[str], pictures: list[str]) -> pa.Table:
    return pa.table({"uid": [f"r{i:03d}" for i in range(len(captions))], "caption": captions,
                     "pixel_sha256": pictures})


def test_one_caption_on_thirty_different_images_is_boilerplate() -> None:
    boiler = [f"Royalty free stock illustration #{i}" for i in range(30)]  # digits differ: one caption still
    copies = ["a red apple on a table"] * 20  # twenty copies of one picture: dedup's business, not boilerplate
    unique = [f"a {word} on a white background" for word in ("cat", "dog", "owl", "fox")]
    captions = boiler + copies + unique
    pictures = [f"b{i}" for i in range(30)] + ["apple"] * 20 + [f"u{i}" for i in range(4)]
    stage = RuleFilter(RulesConfig(boilerplate_captions=True))
    table = _captioned(captions, pictures)
    out = stage.decide(table.select(["uid", *stage.inputs(), *(c for c in stage.optional_inputs()
                                                              if c in table.column_names)])).table
    removed = dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist()))
    assert removed == {f"r{i:03d}": "rule:boilerplate_caption" for i in range(30)}
    # the threshold is relative to the pool: the same thirty among many more rows are not boilerplate
    many = RuleFilter(RulesConfig(boilerplate_captions=True, boilerplate_share=0.6))
    assert many.decide(_captioned(captions, pictures).select(["uid", "caption", "pixel_sha256"])).num_rows == 0
    # without a pixel digest, the bytes' digest tells the pictures apart
    by_bytes = _captioned(captions, pictures).rename_columns(["uid", "caption", "sha256"])
    assert stage.decide(by_bytes).num_rows == 30


def test_over_the_pool_in_tasks_it_removes_and_counts_what_the_whole_table_decides() -> None:
    from curate.core.pool import Pool

    rng = np.random.default_rng(2)
    words = ["photo", "of", "a", "dog", "IMG_1234.jpg", "click here", "123", "the", "cat"]
    n = 600
    captions = [" ".join(rng.choice(words, rng.integers(0, 8))) for _ in range(n)]
    table = pa.table({"uid": [f"u{i:04d}" for i in range(n)], "caption": captions,
                      "original_width": pa.array(rng.integers(10, 400, n), pa.int32()),
                      "original_height": pa.array(rng.integers(10, 400, n), pa.int32())})
    stage = RuleFilter(RulesConfig(min_words=2, max_words=6, junk_captions=True, min_image_side=50,
                                   max_aspect_ratio=3))
    whole = stage.decide(table)
    pooled = stage.decide_pool(Pool.from_table(table, pieces=5))
    pick = lambda removals: dict(zip(*(removals.table.column(c).to_pylist() for c in ("uid", "reason"))))  # noqa: E731
    assert pick(pooled) == pick(whole) and 0 < len(pick(whole)) < n
    assert pooled.would_reject == whole.would_reject and len(whole.would_reject) == 5
    assert stage.decide_pool(Pool.from_table(table.slice(0, 0))).would_reject == {r: 0 for r in whole.would_reject}
