"""Eval decontamination: pool rows that duplicate an eval image (same bytes, a re-encode, the same picture by
embedding) are filtered and name the eval item; unrelated eval images touch nothing."""

from __future__ import annotations

import io
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.demo.pool import _draw
from curate.errors import CurateError
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline
from curate.stages.decontaminate import DecontaminateConfig
from curate.stages.hash import HashConfig
from curate.stages.score import ScoreConfig


@pytest.fixture(scope="module")
def eval_folder(demo_pool, url_list, tmp_path_factory):
    """Two pool images copied byte for byte, one re-encoded at quality 40, one scene the pool never had."""
    root, items = demo_pool
    folder = tmp_path_factory.mktemp("eval") / "images"
    folder.mkdir()
    clean = [item for item in items if item.kind == "clean"]
    urls = pq.read_table(url_list).column("url").to_pylist()
    expected = {}
    for item in clean[:2]:
        shutil.copy(root / "files" / item.name, folder / f"copy_{item.name}")
        expected[urls[items.index(item)]] = f"eval:copy_{item.name}"
    with Image.open(root / "files" / clean[2].name) as img:
        img.convert("RGB").save(folder / "reencoded.jpg", quality=40)
    expected[urls[items.index(clean[2])]] = "eval:reencoded.jpg"
    fresh, _ = _draw(np.random.default_rng([99, 1]), 300, 200, "ring", "black", "white")
    fresh.save(folder / "fresh.png")
    return folder, expected


def _contaminated(out) -> dict[str, str]:
    ledger = read_ledger(out).to_pylist()
    return {row["url"]: row["duplicate_of"] for row in ledger if row["reason"] == "dedup:eval_contamination"}


def test_pool_rows_that_duplicate_eval_images_are_filtered(eval_folder, url_list, make_pipeline, tmp_path) -> None:
    folder, expected = eval_folder
    config = make_pipeline()
    config.stages += [HashConfig(), DecontaminateConfig(eval=str(folder), semantic_threshold=None)]
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    assert check_run(out) == []
    found = _contaminated(out)
    # the planted copies of these images elsewhere in the pool (exact/near duplicates) are contaminated too
    assert set(expected.items()) <= set(found.items())
    assert "eval:fresh.png" not in found.values()
    assert len(found) <= len(expected) + 4, found
    how = Counter(r["eval_match"] for r in read_ledger(out).to_pylist() if r["reason"] == "dedup:eval_contamination")
    assert how and set(how) <= {"sha256", "pixel_sha256", "phash"}, how
    assert read_ledger(out).column("eval_match").null_count == read_ledger(out).num_rows - len(found)


def test_embeddings_match_eval_images_through_the_pipelines_own_model(eval_folder, url_list, make_pipeline,
                                                                       tiny_clip, tmp_path) -> None:
    """Only the semantic comparison on: an eval copy matches its pool row at cosine 1 through the score stage."""
    folder, expected = eval_folder
    parquet = folder.parent / "eval.parquet"
    copies = sorted(p.name for p in folder.iterdir() if p.name.startswith("copy_"))
    pq.write_table(pa.table({"image_path": [f"images/{name}" for name in copies]}), parquet)
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages += [HashConfig(), DecontaminateConfig(eval=str(parquet), exact=False, phash_radius=None,
                                                        semantic_threshold=0.9999)]
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    found = _contaminated(out)
    for url, target in expected.items():
        if target.startswith("eval:copy_"):
            assert found.get(url) == f"eval:images/{target.removeprefix('eval:')}"
    assert Counter(found.values()).keys() <= {f"eval:images/{name}" for name in copies}
    assert {r["eval_match"] for r in read_ledger(out).to_pylist() if r["url"] in found} == {"embedding"}


def test_an_eval_set_without_images_is_one_clear_error(url_list, make_pipeline, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = make_pipeline()
    config.stages += [HashConfig(), DecontaminateConfig(eval=str(empty))]
    with pytest.raises(CurateError, match="no eval images found"):
        run_pipeline(config, input_path=str(url_list), output=tmp_path / "run", local=True, progress=False)


def test_every_pool_row_with_a_matched_phash_is_filtered_after_its_own_colour_check() -> None:
    """The pHash search links an eval code to one row per distinct pool code; the rows sharing that code are
    matched too, unless their colours differ."""
    from curate.core.pool import Pool
    from curate.stages.decontaminate import Decontaminate

    red, blue = bytes([200, 0, 0] * 16), bytes([0, 0, 200] * 16)
    pool = Pool.from_table(pa.table({"uid": ["r0", "r1", "b2", "r3", "r4"],
                                     "phash": pa.array([5, 5, 5, 2**40, 2**50 + 2**20], pa.int64()),
                                     "color_signature": [red, red, blue, red, red]}))
    evals = pa.table({"uid": ["eval:e"], "phash": pa.array([4], pa.int64()), "color_signature": [red]})
    matched: dict[int, str] = {}
    Decontaminate._match_phash(pool, evals, DecontaminateConfig(eval="unused", phash_radius=2), matched)
    assert matched == {0: "eval:e", 1: "eval:e", 3: "eval:e"}  # not the blue copy, not the far code


def test_eval_items_sharing_a_code_are_each_compared() -> None:
    """Two eval images share a pHash in different colours; one eval image has a pool row's very code: each eval
    item is compared with the pool rows, whichever row the search kept for a shared code."""
    from curate.core.pool import Pool
    from curate.stages.decontaminate import Decontaminate

    red, green = bytes([200, 0, 0] * 16), bytes([0, 200, 0] * 16)
    pool = Pool.from_table(pa.table({"uid": ["g0", "r1"], "phash": pa.array([5, 2**40], pa.int64()),
                                     "color_signature": [green, red]}))
    evals = pa.table({"uid": ["eval:green", "eval:red", "eval:same", "eval:near"],  # rows -1, -2, -3, -4
                      "phash": pa.array([4, 4, 2**40, 2**40 + 1], pa.int64()),
                      "color_signature": [green, red, green, red]})
    matched: dict[int, str] = {}
    Decontaminate._match_phash(pool, evals, DecontaminateConfig(eval="unused", phash_radius=1), matched)
    assert matched == {0: "eval:green", 1: "eval:near"}


def test_on_ray_the_eval_images_go_through_the_per_sample_stages_in_workers(
        eval_folder, url_list, make_pipeline, tiny_clip, ray_session, tmp_path, monkeypatch) -> None:
    """No model is loaded in the driver for the eval images: there the score stage's setup fails (Ray workers
    import their own, untouched modules), and the eval copies still match their pool rows by embedding. A rerun
    reuses the eval images' stored results."""
    from curate.stages.score import ScoreStage

    def not_here(*args, **kwargs):
        raise AssertionError("the eval images were scored in the driver")

    monkeypatch.setattr(ScoreStage, "setup", not_here)
    folder, expected = eval_folder
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages += [HashConfig(), DecontaminateConfig(eval=str(folder), exact=False, phash_radius=None,
                                                        semantic_threshold=0.9999)]
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, progress=False)
    assert check_run(out) == []
    found = _contaminated(out)
    copies = {url: target for url, target in expected.items() if target.startswith("eval:copy_")}
    assert copies and all(found.get(url) == target for url, target in copies.items()), found
    stored = out / "outside" / "decontaminate"
    evals = pa.concat_tables([pq.read_table(p) for p in sorted((stored / "parts").glob("*.parquet"))],
                             promote_options="default")
    assert evals.num_rows == sum(1 for _ in folder.iterdir())
    assert evals.column("image_embedding").null_count == 0 and evals.column("phash").null_count == 0
    before = (stored / "stored.json").stat().st_mtime_ns
    run_pipeline(config, input_path=str(url_list), output=out, progress=False)
    assert (stored / "stored.json").stat().st_mtime_ns == before and _contaminated(out) == found
