"""Exact duplicates: the same bytes (``sha256``) or the same decoded pixels (``pixel_sha256``, from the hash stage).

A global stage: the live pool's stored digests are shuffled by digest across tasks, so equal ones meet in one task;
each group keeps one row (the highest ``clip_score``, then the larger original image, then the smallest uid) and
the others are filtered with ``dedup:exact``, each pointing at its survivor in the ledger's ``duplicate_of``.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.dedup.groups import KEEP_POLICY_COLUMNS, decide_groups
from curate.dedup.exact import exact_pair_rows
from curate.core.pool import Pool
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

REASON = "dedup:exact"


class DedupExactConfig(StageConfig):
    stage: Literal["dedup_exact"] = "dedup_exact"
    pixels: bool = Field(True, description="also group equal decoded pixels (needs the hash stage), not only bytes")


class DedupExact(GlobalStage[DedupExactConfig]):
    name = "dedup_exact"
    Config = DedupExactConfig
    fans_out = True

    def inputs(self) -> list[str]:
        return ["sha256"] + (["pixel_sha256"] if self.config.pixels else [])

    def optional_inputs(self) -> list[str]:
        return list(KEEP_POLICY_COLUMNS)

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def decide_pool(self, pool: Pool) -> Removals:
        """Rows are shuffled by digest, so equal digests meet in one task; each group keeps one row."""
        left, right = exact_pair_rows(pool, self.inputs())
        return Removals(decide_groups(pool, left, right, REASON))
