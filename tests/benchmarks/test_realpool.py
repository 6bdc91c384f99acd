"""benchmarks/realpool.py on a tiny fake package tree: what it plants, where, and that the truth matches the files."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def realpool():
    spec = importlib.util.spec_from_file_location("realpool", REPO / "benchmarks" / "realpool.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["realpool"] = module
    spec.loader.exec_module(module)
    return module


def _fake_tuxpaint(tree: Path, n: int) -> dict[str, str]:
    """n stamps as tuxpaint-stamps-default lays them out: a transparent PNG, a .txt with the English description
    first and translations after; plus an SVG stamp (skipped: no renderer) and a stray PNG without text."""
    root = tree / "usr/share/tuxpaint/stamps"
    captions = {}
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("animals" if i % 2 else "household")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGBA", (120 + i, 100), (0, 0, 0, 0))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3)) + (255,)
        ImageDraw.Draw(image).polygon([(10 + i % 30, 90), (60, 5 + i % 40), (110, 90)], fill=colour)
        image.save(folder / f"thing_{i}.png")
        captions[f"thing_{i}"] = f"A drawing of thing number {i}."
        (folder / f"thing_{i}.txt").write_text(f"{captions[f'thing_{i}']}\nde.utf8=Eine Zeichnung {i}.\n"
                                               f"fr.utf8=Un dessin {i}.\n")
    (root / "household" / "vector.svg").write_text("<svg/>")
    (root / "household" / "vector.txt").write_text("A vector stamp.\n")
    Image.new("RGB", (10, 10)).save(root / "household" / "no_text.png")
    return captions


def test_a_pool_from_a_fake_tree_plants_noise_and_keeps_the_truth_apart(realpool, tmp_path) -> None:
    tree, out = tmp_path / "tree", tmp_path / "pool"
    captions = _fake_tuxpaint(tree, 120)
    pictures = realpool.collect(tree, tmp_path / "staging", ["tuxpaint"])
    assert len(pictures) == 120  # the SVG stamp and the PNG without a description are not pictures
    assert {p.caption for p in pictures} == set(captions.values())
    assert all(len(p.translations) == 2 for p in pictures)
    out.mkdir()
    summary = realpool.build_pool(pictures, out, seed=3, eval_share=0.15)

    listing = pq.read_table(out / "pool.parquet").to_pylist()
    truth = pq.read_table(out / "truth.parquet").to_pylist()
    assert [r["name"] for r in listing] == [t["name"] for t in truth]  # one truth row per URL-list row
    assert "kind" not in pq.read_table(out / "pool.parquet").column_names  # the truth stays out of the URL list
    status_only = {"http_404", "http_403", "http_500"}
    assert all((out / "files" / t["name"]).exists() for t in truth if t["kind"] not in status_only)
    kinds = Counter(t["kind"] for t in truth)
    own = [t for t in truth if t["kind"] in ("clean", "shuffled", "translated", "junk", "boilerplate")]
    assert len(own) == summary["pool_pictures"] and len({t["picture"] for t in own}) == len(own)
    assert 0.12 <= kinds["shuffled"] / len(own) <= 0.4  # about a quarter of the pictures' rows
    assert kinds["near_duplicate"] >= 1 and kinds["exact_duplicate"] >= 1 and kinds["near_blank"] >= 1

    position = {t["picture"]: t["row"] for t in own}
    for t in truth:
        if t["kind"] in ("exact_duplicate", "near_duplicate"):
            assert position[t["picture"]] < t["row"]  # a copy comes after its original
            original = next(o for o in own if o["picture"] == t["picture"])
            assert listing[t["row"]]["caption"] == listing[original["row"]]["caption"]
        if t["kind"] == "exact_duplicate":
            original = next(o for o in own if o["picture"] == t["picture"])
            assert (out / "files" / t["name"]).read_bytes() == (out / "files" / original["name"]).read_bytes()
        if t["kind"] in ("translated", "junk", "boilerplate"):
            assert not t["caption_ok"] and listing[t["row"]]["caption"] != t["true_caption"]
        if t["kind"] == "clean":
            assert t["caption_ok"] and listing[t["row"]]["caption"] == t["true_caption"]
        if t["kind"] == "near_blank":
            assert t["picture"] is None
    boiler = Counter(listing[t["row"]]["caption"] for t in truth if t["kind"] == "boilerplate")
    assert set(boiler) <= set(realpool.BOILERPLATE)

    held_out = pq.read_table(out / "eval" / "eval.parquet").to_pylist()
    assert len(held_out) == summary["eval_pictures"] > 0
    assert not {h["picture"] for h in held_out} & {t["picture"] for t in truth}  # never in the pool
    served = {(out / "files" / t["name"]).read_bytes() for t in truth if (out / "files" / t["name"]).exists()}
    assert not any((out / "eval" / h["image_path"]).read_bytes() in served for h in held_out)
    assert {h["caption"] for h in held_out} <= set(captions.values())


def test_the_acceptance_packages_are_refused(realpool, tmp_path) -> None:
    with pytest.raises(SystemExit, match="reserved for the acceptance check"):
        realpool.fetch(tmp_path, ("tuxpaint-stamps-default", "openclipart-png"))
