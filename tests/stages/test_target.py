"""Target-distribution filtering (DataComp image-based): the pool's clusters that target images fall in are kept,
the others filtered; the target images go through the pipeline's own stages."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.ledger import check_run, read_ledger
from curate.core.pool import Pool
from curate.core.runner import run_pipeline
from curate.errors import CurateError
from curate.stages.hash import HashConfig
from curate.stages.score import ScoreConfig
from curate.stages.target import TargetConfig, TargetFilter, _top_clusters


def embedded(vectors: np.ndarray, model: str = "m", uid_prefix: str = "") -> pa.Table:
    n = len(vectors)
    return pa.table({"uid": [f"{uid_prefix}{i:032x}" for i in range(n)], "row": pa.array(range(n), pa.int64()),
                     "clip_model": [model] * n,
                     "image_embedding": pa.array(list(vectors.astype(np.float16)), pa.list_(pa.float16()))})


def blobs(rng: np.random.Generator, centres: list[int], per_blob: int, dim: int = 8) -> np.ndarray:
    return np.concatenate([np.eye(dim)[c] + 0.05 * rng.standard_normal((per_blob, dim)) for c in centres])


def test_the_fewest_clusters_holding_the_share_of_votes_are_kept() -> None:
    votes = np.array([0, 5, 3, 2, 0])
    assert _top_clusters(votes, 0.5).tolist() == [1]
    assert _top_clusters(votes, 0.8).tolist() == [1, 2]
    assert _top_clusters(votes, 1.0).tolist() == [1, 2, 3]  # never a cluster without a target image


def test_rows_outside_the_targets_clusters_are_filtered() -> None:
    rng = np.random.default_rng(0)
    pool = Pool.from_table(embedded(blobs(rng, [0, 1, 2], 200)))
    stage = TargetFilter(TargetConfig(images="unused", clusters=3, fit_sample=600))
    stage.receive_outside(embedded(blobs(rng, [0], 20), uid_prefix="target:"))
    removed = stage.decide_pool(pool)
    assert sorted(removed.table.column("row").to_pylist()) == list(range(200, 600))
    assert set(removed.table.column("reason").to_pylist()) == {"target:far_from_target"}

    wider = TargetFilter(TargetConfig(images="unused", clusters=3, fit_sample=600))
    wider.receive_outside(embedded(np.concatenate([blobs(rng, [0], 20), blobs(rng, [2], 5)]), uid_prefix="target:"))
    assert sorted(wider.decide_pool(pool).table.column("row").to_pylist()) == list(range(200, 400))


def test_targets_embedded_by_another_model_are_one_clear_error() -> None:
    rng = np.random.default_rng(1)
    stage = TargetFilter(TargetConfig(images="unused", clusters=2, fit_sample=100))
    stage.receive_outside(embedded(blobs(rng, [0], 5), model="other"))
    with pytest.raises(CurateError, match="no target image was embedded by m"):
        stage.decide_pool(Pool.from_table(embedded(blobs(rng, [0, 1], 100))))


def test_a_pipeline_keeps_the_clusters_of_its_target_images(demo_pool, url_list, make_pipeline, tiny_clip,
                                                           tmp_path) -> None:
    root, items = demo_pool
    folder = tmp_path / "target"
    folder.mkdir()
    clean = [item for item in items if item.kind == "clean"][:6]
    for item in clean:
        shutil.copy(root / "files" / item.name, folder / item.name)
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages += [HashConfig(), TargetConfig(images=str(folder), clusters=4, fit_sample=100, target_share=0.5)]
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    assert check_run(out) == []
    ledger = read_ledger(out).to_pylist()
    far = [r for r in ledger if r["reason"] == "target:far_from_target"]
    kept = [r for r in ledger if r["status"] == "kept"]
    assert far and kept and all(r["decided_by"] == "target" for r in far)
    targets = pq.read_table(out / "outside" / "target" / "parts")
    assert targets.num_rows == len(clean) and targets.column("image_embedding").null_count == 0
