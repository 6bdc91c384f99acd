"""The alignment filter decides over stored scores: both sides of each boundary, per-model ranking, order-free."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.core.pipeline import validate_pipeline
from curate.errors import CurateError
from curate.stages.alignment import BELOW_MIN, BELOW_TOP, AlignmentConfig, AlignmentFilter


def _metadata(scores: list[float], models: list[str] | None = None) -> pa.Table:
    n = len(scores)
    return pa.table({"uid": [f"{i:04x}" for i in range(n)], "clip_score": pa.array(scores, pa.float32()),
                     "clip_model": models or ["m"] * n})


def _removed(config: AlignmentConfig, table: pa.Table) -> dict[str, str]:
    out = AlignmentFilter(config).decide(table).table
    assert set(out.column("status").to_pylist()) <= {"filtered"}
    return dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist()))


def test_min_score_keeps_rows_at_the_threshold_and_drops_those_below() -> None:
    table = _metadata([0.2499, 0.25, 0.2501, -0.5, float("nan")])
    removed = _removed(AlignmentConfig(min_score=0.25), table)
    assert removed == {"0000": BELOW_MIN, "0003": BELOW_MIN, "0004": BELOW_MIN}


def test_keep_top_ranks_within_each_model() -> None:
    # model a scores high overall, model b low: a global cut would drop all of b; per model each keeps its best half
    scores = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0]
    models = ["a"] * 4 + ["b"] * 4
    removed = _removed(AlignmentConfig(keep_top=0.5), _metadata(scores, models))
    assert set(removed) == {"0002", "0003", "0006", "0007"}
    assert set(removed.values()) == {BELOW_TOP}


def test_keep_top_keeps_the_ceiling_and_breaks_ties_by_uid_whatever_the_order() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(0, 1, 101), 1).tolist()  # many ties
    table = _metadata(scores)
    config = AlignmentConfig(keep_top=0.3)
    removed = _removed(config, table)
    assert len(scores) - len(removed) == 31  # ceil(0.3 × 101)
    kept = [s for i, s in enumerate(scores) if f"{i:04x}" not in removed]
    assert min(kept) >= max(s for i, s in enumerate(scores) if f"{i:04x}" in removed)
    shuffled = table.take(rng.permutation(table.num_rows))
    assert _removed(config, shuffled) == removed


@pytest.mark.parametrize("fields", [{}, {"min_score": 0.2, "keep_top": 0.3}])
def test_exactly_one_rule_is_required(fields: dict) -> None:
    raw = {"name": "p", "input": {"path": "x.parquet"}, "output": {"path": "out"},
           "stages": [{"stage": "download"}, {"stage": "score"}, {"stage": "alignment", **fields}]}
    with pytest.raises(CurateError, match="exactly one of min_score"):
        validate_pipeline(raw, "p.yaml")


def test_alignment_needs_a_score_stage_before_it() -> None:
    raw = {"name": "p", "input": {"path": "x.parquet"}, "output": {"path": "out"},
           "stages": [{"stage": "download"}, {"stage": "alignment", "keep_top": 0.3}]}
    with pytest.raises(CurateError, match="needs column 'clip_score'"):
        validate_pipeline(raw, "p.yaml")


def _embedded_pool(seed: int = 0) -> tuple[pa.Table, set[str]]:
    """Embeddings as CLIPs make them, sharing one common direction: 200 aligned pairs whose captions fit their own
    image, and 30 rows of one boilerplate caption (the common direction itself) on random images, which a raw
    cosine puts above the aligned pairs."""
    rng = np.random.default_rng(seed)
    d = 32
    common = rng.normal(size=d)
    common /= np.linalg.norm(common)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    own = unit(rng.normal(size=(230, d)))
    images = unit(common + 0.5 * own)
    texts = unit(common + 0.5 * own + 0.7 * unit(rng.normal(size=(230, d))))
    texts[200:] = common  # the boilerplate caption
    uids = [f"{int(h):032x}" for h in rng.integers(0, 2**62, size=230)]
    scores = np.einsum("ij,ij->i", images, texts)
    table = pa.table({"uid": uids, "clip_score": pa.array(scores, pa.float32()), "clip_model": ["m"] * 230,
                      "image_embedding": pa.array(images.astype(np.float16).tolist(), pa.list_(pa.float16())),
                      "text_embedding": pa.array(texts.astype(np.float16).tolist(), pa.list_(pa.float16())),
                      "status": ["ok"] * 230})
    return table, set(uids[200:])


def test_relative_ranking_does_not_reward_a_caption_for_being_common() -> None:
    from curate.core.pool import Pool

    table, boilerplate = _embedded_pool()
    raw = AlignmentFilter(AlignmentConfig(keep_top=0.7))
    raw_removed = set(raw.decide_pool(Pool.from_table(table.select(["uid", "clip_score", "clip_model"])))
                      .table.column("uid").to_pylist())
    assert not boilerplate & raw_removed  # the quirk: the raw cosine keeps every boilerplate row
    relative = AlignmentFilter(AlignmentConfig(keep_top=0.7, relative=True, reference_rows=64, neighbours=64))
    out = relative.decide_pool(Pool.from_table(table, pieces=3)).table
    removed = set(out.column("uid").to_pylist())
    assert boilerplate <= removed and len(removed) == 230 - 161  # ceil(0.7 × 230) kept
    assert out.column("row").to_pylist() == [table.column("uid").to_pylist().index(u) for u in
                                             out.column("uid").to_pylist()]
    # the same decisions however the pool is cut into pieces
    again = relative.decide_pool(Pool.from_table(table, pieces=7)).table
    assert set(again.column("uid").to_pylist()) == removed


def test_relative_scores_are_the_same_in_chunks(monkeypatch) -> None:
    """The neighbours' cosines are taken a chunk of rows at a time (a pool part's rows × the reference would not fit
    in memory): the scores do not depend on the chunk size."""
    from curate.core.pool import Pool
    from curate.stages import alignment

    table, _ = _embedded_pool()
    pool = Pool.from_table(table, pieces=2)
    whole = alignment.relative_scores(pool, 64, 10).sort_by("row")
    monkeypatch.setattr(alignment, "HUB_CHUNK", 7)
    chunked = alignment.relative_scores(pool, 64, 10).sort_by("row")
    assert np.allclose(whole.column("score").to_numpy(), chunked.column("score").to_numpy(), atol=1e-6)
    raw = table.column("clip_score").to_numpy().astype(np.float64)
    assert not np.allclose(whole.column("score").to_numpy(), raw)  # the correction did something


@pytest.mark.parametrize("settings, words", [({"keep_top": 0.5, "relative": True, "column": "itm_score"}, "itm_score"),
                                             ({"min_score": 0.2, "relative": True}, "keep_top")])
def test_relative_ranking_refuses_settings_it_cannot_honour(settings, words) -> None:
    with pytest.raises(ValueError, match=words):
        AlignmentConfig(**settings)


@pytest.mark.parametrize("config", [AlignmentConfig(keep_top=0.3), AlignmentConfig(keep_top=0.75),
                                    AlignmentConfig(min_score=0.5)], ids=["top30", "top75", "min"])
def test_over_the_pool_in_tasks_it_removes_what_the_whole_table_decides(config) -> None:
    """decide_pool sends the driver one score per row and then only the removed and tied rows; it must cut where
    decide() cuts over the gathered table: ties at the cut (scores on a coarse grid), rows without a score, rows
    without a model, three models spread over the pieces."""
    from curate.core.pool import Pool

    rng = np.random.default_rng(4)
    n = 3000
    scores = np.round(rng.random(n), 1).astype(np.float32)  # eleven distinct values: many ties at any cut
    scores[rng.choice(n, 40, replace=False)] = np.nan
    models = rng.choice(np.array(["a", "b", "c", None], dtype=object), n, p=[0.5, 0.3, 0.15, 0.05]).tolist()
    order = rng.permutation(n)
    table = pa.table({"uid": [f"{i:08x}" for i in order], "clip_score": pa.array(scores[order], pa.float32()),
                      "clip_model": pa.array([models[i] for i in order], pa.string())})
    stage = AlignmentFilter(config)
    whole = stage.decide(table).table
    pooled = stage.decide_pool(Pool.from_table(table, pieces=7)).table
    expected = dict(zip(whole.column("uid").to_pylist(), whole.column("reason").to_pylist()))
    got = dict(zip(pooled.column("uid").to_pylist(), pooled.column("reason").to_pylist()))
    assert got == expected and 0 < len(got) < n
    rows_of = dict(zip(table.column("uid").to_pylist(), range(n)))
    assert pooled.column("row").to_pylist() == [rows_of[u] for u in pooled.column("uid").to_pylist()]
