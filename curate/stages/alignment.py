"""The alignment filter: a decision over stored CLIP scores, cheap to redo with another threshold.

``min_score`` keeps rows whose score reaches an absolute cosine; ``keep_top`` keeps the best fraction of the pool,
ranked within each scoring model (the ``clip_model`` column). Ranking per model matters: cosines of different models
are on different scales, and a bootstrapped score (one model per fold) is only comparable inside its fold.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.stage import FILTERED, GlobalStage, StageConfig

BELOW_MIN, BELOW_TOP = "alignment:below_min_score", "alignment:below_top_fraction"


class AlignmentConfig(StageConfig):
    stage: Literal["alignment"] = "alignment"
    column: str = Field("clip_score", description="the score column to filter on (clip_score or itm_score)")
    min_score: float | None = Field(None, ge=-1, le=1, description="keep rows whose score is at least this cosine")
    keep_top: float | None = Field(
        None, gt=0, le=1, description="keep this fraction of the live rows with the highest scores, per model "
        "(e.g. 0.3 for DataComp's CLIP top-30%)")

    @model_validator(mode="after")
    def _one_rule(self) -> AlignmentConfig:
        if (self.min_score is None) == (self.keep_top is None):
            raise ValueError("give exactly one of min_score (an absolute cosine) or keep_top (a fraction of the pool)")
        return self


class AlignmentFilter(GlobalStage):
    name = "alignment"
    Config = AlignmentConfig
    counts_would_reject = True

    def inputs(self) -> list[str]:
        return [self.config.column, "clip_model"]  # type: ignore[attr-defined]

    def decide(self, metadata: pa.Table) -> pa.Table:
        config: AlignmentConfig = self.config  # type: ignore[assignment]
        uids = np.asarray(metadata.column("uid").to_pylist(), dtype=object)
        scores = metadata.column(config.column).to_numpy(zero_copy_only=False).astype(np.float64)
        scores = np.where(np.isnan(scores), -np.inf, scores)  # a row without a score never ranks above one with it
        if config.min_score is not None:
            removed, reason = scores < config.min_score, BELOW_MIN
        else:
            removed, reason = self.outside_top(uids, scores, metadata.column("clip_model").to_pylist(),
                                                config.keep_top), BELOW_TOP  # type: ignore[arg-type]
        out = uids[removed].tolist()
        return pa.table({"uid": pa.array(out, pa.string()), "status": pa.array([FILTERED] * len(out), pa.string()),
                         "reason": pa.array([reason] * len(out), pa.string())})

    @staticmethod
    def outside_top(uids: np.ndarray, scores: np.ndarray, models: list[str | None], fraction: float) -> np.ndarray:
        """Per model, all but the ceil(fraction × n) best rows; equal scores are ranked by uid so the cut is
        the same whatever order the rows come in."""
        removed = np.zeros(len(uids), dtype=bool)
        by_model: dict[str | None, list[int]] = {}
        for i, model in enumerate(models):
            by_model.setdefault(model, []).append(i)
        for rows in by_model.values():
            index = np.asarray(rows)
            order = index[np.lexsort((uids[index], -scores[index]))]
            removed[order[math.ceil(fraction * len(index)):]] = True
        return removed
