"""Per-sample stages in one process decode each stored image once: hash decodes it, score reuses it, and sharing
changes no result."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from curate.core import decoded
from curate.core.worker import StageWorker
from curate.stages.hash import HashConfig, HashStage
from curate.stages.score import ScoreConfig, ScoreStage


def stored_rows(pairs: list[tuple[bytes, str]]) -> pa.Table:
    n = len(pairs)
    return pa.table({"uid": [f"u{i}" for i in range(n)], "image": [p[0] for p in pairs],
                     "caption": [p[1] for p in pairs], "status": ["ok"] * n, "reason": pa.nulls(n, pa.string()),
                     "decided_by": pa.nulls(n, pa.string())})


def hash_then_score(table: pa.Table, tiny_clip) -> pa.Table:
    for stage in (HashStage(HashConfig()), ScoreStage(ScoreConfig(model=str(tiny_clip)))):
        table = StageWorker(stage)(table)
    return table


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = decoded.DecodedImages()
    monkeypatch.setattr(decoded, "STORED", cache)
    return cache


def test_hash_then_score_decode_each_stored_image_once(pool_images, tiny_clip, fresh_cache) -> None:
    pairs = pool_images[:12]
    shared = hash_then_score(stored_rows(pairs), tiny_clip)
    assert (fresh_cache.decoded, fresh_cache.reused) == (len(pairs), len(pairs))

    fresh_cache.clear()
    fresh_cache.max_pixels = 0  # nothing kept: every stage decodes for itself
    alone = hash_then_score(stored_rows(pairs), tiny_clip)
    assert (fresh_cache.decoded, fresh_cache.reused) == (2 * len(pairs), 0)
    for column in ("phash", "pixel_sha256", "content_phash", "clip_score"):
        assert shared.column(column).to_pylist() == alone.column(column).to_pylist(), column


def test_the_cache_holds_at_most_its_pixels_and_drops_the_least_recently_used(fresh_cache) -> None:
    def png(colour: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (10, 10), colour).save(out, format="PNG")
        return out.getvalue()

    images = [png((200, 0, 0)), png((0, 200, 0)), png((0, 0, 200))]
    fresh_cache.max_pixels = 2 * 10 * 10  # room for two of them
    first = fresh_cache.rgb(images[0])
    fresh_cache.rgb(images[1])
    assert fresh_cache.rgb(images[0]) is first  # used again: now the most recent
    fresh_cache.rgb(images[2])  # evicts images[1], the least recently used
    assert fresh_cache.rgb(images[0]) is first
    before = fresh_cache.decoded
    assert fresh_cache.rgb(images[1]).getpixel((0, 0)) == (0, 200, 0)
    assert fresh_cache.decoded == before + 1
