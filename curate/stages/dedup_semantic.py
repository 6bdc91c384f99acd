"""Semantic duplicates (SemDeDup): images whose stored CLIP embeddings are nearly the same direction.

Catches what hashes miss — crops, re-renders, the same photo with a watermark. Rows are clustered with spherical
k-means (faiss) per scoring model (embeddings of different models live in different spaces), pairs inside a cluster
at cosine ≥ ``threshold`` are duplicates, and each group keeps one row by dedup_exact's keep policy; the others are
filtered with ``dedup:semantic``, pointing at the survivor. The work runs in tasks over the stored parts
(curate.dedup.semantic); the driver holds the k-means sample (``fit_sample`` rows) and the pairs found.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.dedup.groups import KEEP_POLICY_COLUMNS, decide_groups
from curate.core.pool import Pool
from curate.dedup.semantic import semantic_pair_rows
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

REASON = "dedup:semantic"


class DedupSemanticConfig(StageConfig):
    stage: Literal["dedup_semantic"] = "dedup_semantic"
    threshold: float = Field(0.95, gt=0, le=1, description="cosine of image embeddings at or above which two rows "
                             "are duplicates (SemDeDup's 1 - eps)")
    clusters: int | None = Field(None, ge=1, description="k-means clusters per model; default: one per 1000 rows, "
                                 "at most one per 40 rows of the fit sample")
    fit_sample: int = Field(100_000, ge=100, description="rows k-means is fitted on (all rows are assigned)")
    seed: int = 0


class DedupSemantic(GlobalStage[DedupSemanticConfig]):
    name = "dedup_semantic"
    Config = DedupSemanticConfig
    fans_out = True

    def inputs(self) -> list[str]:
        return ["image_embedding", "clip_model"]

    def optional_inputs(self) -> list[str]:
        return list(KEEP_POLICY_COLUMNS)

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def decide_pool(self, pool: Pool) -> Removals:
        config: DedupSemanticConfig = self.config
        left, right = semantic_pair_rows(pool, config.threshold, config.clusters, config.fit_sample, config.seed)
        return Removals(decide_groups(pool, left, right, REASON))
