"""Semantic duplicates (SemDeDup): images whose stored CLIP embeddings are nearly the same direction.

Catches what hashes miss — crops, re-renders, the same photo with a watermark. Rows are clustered with spherical
k-means (faiss) per scoring model (embeddings of different models live in different spaces), pairs inside a cluster
at cosine ≥ ``threshold`` are duplicates, and each group keeps one row by dedup_exact's keep policy; the others are
filtered with ``dedup:semantic``, pointing at the survivor. Memory: the live rows' embeddings as float32 (2 KB per
row at 512 dimensions) plus one block of similarities (128 MB).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup import groups_of, removals, semantic_pairs
from curate.stage import GlobalStage, StageConfig
from curate.stages.dedup_exact import KEEP_POLICY_COLUMNS, keep_policy_inputs
from curate.stages.score import embedding_matrix

REASON = "dedup:semantic"


class DedupSemanticConfig(StageConfig):
    stage: Literal["dedup_semantic"] = "dedup_semantic"
    threshold: float = Field(0.95, gt=0, le=1, description="cosine of image embeddings at or above which two rows "
                             "are duplicates (SemDeDup's 1 - eps)")
    clusters: int | None = Field(None, ge=1, description="k-means clusters per model; default: one per 1000 rows")
    fit_sample: int = Field(100_000, ge=100, description="rows k-means is fitted on (all rows are assigned)")
    seed: int = 0


def unit_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float16> embedding column as an (n, d) float32 matrix with L2-normalised rows."""
    x = embedding_matrix(column).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class DedupSemantic(GlobalStage):
    name = "dedup_semantic"
    Config = DedupSemanticConfig
    fans_out = True

    def inputs(self) -> list[str]:
        return ["image_embedding", "clip_model"]

    def optional_inputs(self) -> list[str]:
        return list(KEEP_POLICY_COLUMNS)

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def decide(self, metadata: pa.Table) -> pa.Table:
        config: DedupSemanticConfig = self.config  # type: ignore[assignment]
        embedded = metadata.filter(pc.is_valid(metadata.column("image_embedding")))
        pieces = []
        for model in sorted(set(embedded.column("clip_model").to_pylist()), key=str):
            rows = embedded.filter(pc.equal(embedded.column("clip_model"), model))
            left, right = semantic_pairs(unit_rows(rows.column("image_embedding")), config.threshold,
                                         config.clusters, config.fit_sample, config.seed)
            scores, pixels = keep_policy_inputs(rows)
            pieces.append(removals(rows.column("uid").to_pylist(), groups_of(rows.num_rows, left, right), scores,
                                   pixels, REASON))
        if not pieces:
            return removals([], np.zeros(0, np.int64), None, None, REASON)
        return pa.concat_tables(pieces)
