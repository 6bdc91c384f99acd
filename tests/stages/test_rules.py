"""Rule filters: each rule with rows on both sides of its boundary; the first failed rule names the reason, and each
rule counts every row it would reject on its own."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.stages.rules import RuleFilter, RulesConfig


def _decide(rows: list[tuple[str, int, int]], **rules) -> tuple[dict[str, str], dict[str, int]]:
    """rows: (caption, width, height); returns uid → reason of the removed rows, and the would-reject counts."""
    stage = RuleFilter(RulesConfig(**rules))
    table = pa.table({"uid": [f"r{i}" for i in range(len(rows))], "caption": [r[0] for r in rows],
                      "original_width": pa.array([r[1] for r in rows], pa.int32()),
                      "original_height": pa.array([r[2] for r in rows], pa.int32())})
    out = stage.decide(table.select(["uid", *stage.inputs()]))
    assert set(out.column("status").to_pylist()) <= {"filtered"}
    return dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist())), stage.would_reject


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
