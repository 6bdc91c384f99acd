"""The alignment filter decides over stored scores: both sides of each boundary, per-model ranking, order-free."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.config import validate_pipeline
from curate.errors import CurateError
from curate.stages.alignment import BELOW_MIN, BELOW_TOP, AlignmentConfig, AlignmentFilter


def _metadata(scores: list[float], models: list[str] | None = None) -> pa.Table:
    n = len(scores)
    return pa.table({"uid": [f"{i:04x}" for i in range(n)], "clip_score": pa.array(scores, pa.float32()),
                     "clip_model": models or ["m"] * n})


def _removed(config: AlignmentConfig, table: pa.Table) -> dict[str, str]:
    out = AlignmentFilter(config).decide(table)
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
