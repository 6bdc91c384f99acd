"""Perceptual duplicates: pHashes within ``radius`` bits whose colour grids also agree.

Candidates come from multi-index hashing and banding over the stored hashes (curate.dedup.phash_pair_rows: a
shuffle by hash band across tasks, never all pairs); a pair counts when
its pHashes are within ``radius`` and no channel of any cell of its 4 × 4 colour grids differs by more than
``max_color_difference`` (pHash is blind to hue). Pairs join into groups (connected components); each group keeps one row by the keep policy
of dedup_exact and filters the others with ``dedup:phash``, pointing at the survivor.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.dedup import (DEFAULT_RADIUS, KEEP_POLICY_COLUMNS, MAX_RADIUS, color_differences, decide_groups,
                          phash_pair_rows)
from curate.pool import Pool
from curate.stage import GlobalStage, StageConfig

REASON = "dedup:phash"


class DedupPhashConfig(StageConfig):
    stage: Literal["dedup_phash"] = "dedup_phash"
    radius: int = Field(DEFAULT_RADIUS, ge=0, le=MAX_RADIUS, description="largest Hamming distance between "
                        "duplicates' 64-bit pHashes (8 finds JPEG re-encodes, resizes and most 5% crops; see "
                        "benchmarks/dedup.py; above 12 the banding search needs thousands of tables)")
    max_color_difference: float = Field(28.0, ge=0, le=255, description="largest difference of any channel of any "
                                        "cell of the 4 × 4 RGB grids (0-255): a 10% brighter copy differs by about "
                                        "23, the same shape in another colour by 30 or more")
    seed: int = Field(0, description="seed of the banding tables' bit samples")


def colours_agree(limit: float):
    """The pair check of the pHash tier: pHash is blind to hue, the 4 × 4 colour grids are not."""
    def check(info: pa.Table, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return color_differences(info.column("color_signature").to_pylist(), left, right) <= limit
    return check


class DedupPhash(GlobalStage):
    name = "dedup_phash"
    Config = DedupPhashConfig
    fans_out = True

    def inputs(self) -> list[str]:
        return ["phash", "color_signature"]

    def optional_inputs(self) -> list[str]:
        return list(KEEP_POLICY_COLUMNS)

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def decide_pool(self, pool: Pool) -> pa.Table:
        config: DedupPhashConfig = self.config  # type: ignore[assignment]
        left, right = phash_pair_rows(pool, radius=config.radius, seed=config.seed)
        return decide_groups(pool, left, right, REASON, ["color_signature"],
                             colours_agree(config.max_color_difference))
