"""Exact duplicates: the same bytes (``sha256``) or the same decoded pixels (``pixel_sha256``, from the hash stage).

A global stage: it groups the stored digests of the live pool, keeps one row per group (the highest ``clip_score``,
then the larger original image, then the smallest uid) and filters the others with ``dedup:exact``, each pointing
at its survivor in the ledger's ``duplicate_of``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.dedup import groups_of, removals
from curate.stage import GlobalStage, StageConfig

REASON = "dedup:exact"
KEEP_POLICY_COLUMNS = ("clip_score", "original_width", "original_height")


def keep_policy_inputs(metadata: pa.Table) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(clip_score, original pixel count) for the keep policy, each None when the pipeline does not store it."""
    names = metadata.column_names
    scores = metadata.column("clip_score").to_numpy(zero_copy_only=False) if "clip_score" in names else None
    pixels = None
    if "original_width" in names and "original_height" in names:
        width = metadata.column("original_width").to_numpy(zero_copy_only=False).astype(np.float64)
        pixels = width * metadata.column("original_height").to_numpy(zero_copy_only=False).astype(np.float64)
    return scores, pixels


class DedupExactConfig(StageConfig):
    stage: Literal["dedup_exact"] = "dedup_exact"
    pixels: bool = Field(True, description="also group equal decoded pixels (needs the hash stage), not only bytes")


class DedupExact(GlobalStage):
    name = "dedup_exact"
    Config = DedupExactConfig

    def inputs(self) -> list[str]:
        return ["sha256"] + (["pixel_sha256"] if self.config.pixels else [])  # type: ignore[attr-defined]

    def optional_inputs(self) -> list[str]:
        return list(KEEP_POLICY_COLUMNS)

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def decide(self, metadata: pa.Table) -> pa.Table:
        n = metadata.num_rows
        left, right = [], []
        for column in self.inputs():  # rows sharing a digest are chained to the first row with it
            digests = np.asarray(metadata.column(column).to_pylist(), dtype=object)
            present = np.flatnonzero(digests != None)  # noqa: E711 (elementwise)
            _, first, inverse = np.unique(digests[present].astype(str), return_index=True, return_inverse=True)
            chained = present[first[inverse]] != present
            left.append(present[first[inverse]][chained])
            right.append(present[chained])
        labels = groups_of(n, np.concatenate(left), np.concatenate(right)) if n else np.zeros(0, np.int64)
        scores, pixels = keep_policy_inputs(metadata)
        return removals(metadata.column("uid").to_pylist(), labels, scores, pixels, REASON)
