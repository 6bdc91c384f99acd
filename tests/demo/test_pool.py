"""The synthetic pool: sizes, planted kinds, determinism, and the files served through FaultServer."""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image, UnidentifiedImageError

from curate.demo.pool import COLOURS, SHAPES, PoolItem, make_pool, write_url_list
from curate.demo.server import FaultServer

ALL_KINDS = {
    "clean", "misaligned", "exact_duplicate", "near_duplicate", "http_404", "http_403", "http_500", "slow",
    "flaky", "redirect", "truncated", "bomb", "not_an_image", "alpha", "too_small", "extreme_aspect",
}
HTTP_KINDS = {"http_404", "http_403", "http_500"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PoolItem]]:
    root = tmp_path_factory.mktemp("pool")
    return root, make_pool(root, n=100, seed=0)


def one(items: list[PoolItem], kind: str) -> PoolItem:
    return next(item for item in items if item.kind == kind)


def test_size_and_every_kind(pool: tuple[Path, list[PoolItem]]) -> None:
    _, items = pool
    assert len(items) == 100
    assert {item.kind for item in items} == ALL_KINDS
    assert len({item.name for item in items}) == 100
    counts = collections.Counter(item.kind for item in items)
    assert counts["misaligned"] == 10 and counts["exact_duplicate"] == 4 and counts["bomb"] == 1


@pytest.mark.parametrize("n", [20, 21, 57])
def test_small_pools_are_exact_and_complete(tmp_path: Path, n: int) -> None:
    items = make_pool(tmp_path, n=n, seed=3)
    assert len(items) == n
    assert {item.kind for item in items} == ALL_KINDS


def test_too_small_n_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n >= 20"):
        make_pool(tmp_path, n=10)


def test_deterministic(tmp_path: Path) -> None:
    a = make_pool(tmp_path / "a", n=40, seed=7)
    b = make_pool(tmp_path / "b", n=40, seed=7)
    assert a == b
    files_a = sorted(p.name for p in (tmp_path / "a" / "files").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b" / "files").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / "files" / name).read_bytes() == (tmp_path / "b" / "files" / name).read_bytes()
    c = make_pool(tmp_path / "c", n=40, seed=8)
    assert [item.caption for item in c] != [item.caption for item in a]


def test_clean_images_decode_and_captions_name_the_scene(pool: tuple[Path, list[PoolItem]]) -> None:
    root, items = pool
    formats = collections.Counter()
    for item in items:
        if item.kind != "clean":
            continue
        with Image.open(root / "files" / item.name) as im:
            im.load()
            formats[im.format] += 1
            assert im.mode == "RGB"
            assert 160 <= im.width <= 640 and 160 <= im.height <= 640
        assert sum(shape in item.caption for shape in SHAPES) == 1
        assert sum(f" {colour}" in f" {item.caption}" for colour in COLOURS) == 2  # shape colour + background
    assert formats["JPEG"] > formats["PNG"] + formats["WEBP"] > 0


def test_duplicates(pool: tuple[Path, list[PoolItem]]) -> None:
    root, items = pool
    clean = [item for item in items if item.kind == "clean"]
    clean_bytes = {(root / "files" / item.name).read_bytes(): item for item in clean}
    for item in items:
        if item.kind == "exact_duplicate":
            src = clean_bytes[(root / "files" / item.name).read_bytes()]  # byte-identical to a clean file
            assert src.caption == item.caption and src.name < item.name
        if item.kind == "near_duplicate":
            assert (root / "files" / item.name).read_bytes() not in clean_bytes
            assert item.caption in {c.caption for c in clean if c.name < item.name}
            with Image.open(root / "files" / item.name) as im:
                im.load()


def test_bomb_header_is_huge_file_is_small(pool: tuple[Path, list[PoolItem]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, items = pool
    path = root / "files" / one(items, "bomb").name
    assert path.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):  # what a default PIL decoder says about it
        Image.open(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as im:  # reads the header only
        assert im.size == (20000, 20000)


def test_broken_files(pool: tuple[Path, list[PoolItem]]) -> None:
    root, items = pool
    with Image.open(root / "files" / one(items, "truncated").name) as im:
        assert im.format == "JPEG"
        with pytest.raises(OSError, match="truncated"):
            im.load()
    with pytest.raises(UnidentifiedImageError):
        Image.open(root / "files" / one(items, "not_an_image").name)
    for kind in HTTP_KINDS:
        assert not (root / "files" / one(items, kind).name).exists()


def test_odd_images(pool: tuple[Path, list[PoolItem]]) -> None:
    root, items = pool
    with Image.open(root / "files" / one(items, "alpha").name) as im:
        assert im.mode == "RGBA"
        alpha = im.getchannel("A")
        assert alpha.getextrema() == (0, 255)  # transparent background around an opaque shape
    with Image.open(root / "files" / one(items, "too_small").name) as im:
        assert im.size == (24, 24)
    with Image.open(root / "files" / one(items, "extreme_aspect").name) as im:
        assert im.size == (1200, 60)


def test_url_list_and_served_statuses(pool: tuple[Path, list[PoolItem]], tmp_path: Path) -> None:
    root, items = pool
    with FaultServer(root / "files", slow_seconds=0.05) as server:
        path = write_url_list(items, server.base_url, tmp_path / "lists" / "urls.parquet")
        table = pq.read_table(path)
        assert table.column_names == ["url", "caption", "kind"]
        rows = table.to_pylist()
        assert len(rows) == len(items)
        assert rows[0]["url"] == f"{server.base_url}/{items[0].route}/{items[0].name}"
        expected = {"http_404": 404, "http_403": 403, "http_500": 500, "flaky": 503}
        with requests.Session() as session:
            for row, item in zip(rows, items):
                r = session.get(row["url"], timeout=5)
                assert r.status_code == expected.get(item.kind, 200), item
                if item.kind == "redirect":
                    assert r.history and r.content == (root / "files" / item.name).read_bytes()
                if item.kind == "flaky":
                    assert session.get(row["url"], timeout=5).status_code == 200
