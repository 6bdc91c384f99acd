"""Perceptual duplicates: pHashes within ``radius`` bits whose colour grids also agree.

Candidates come from banding over the stored hashes (curate.dedup.phash_pairs, never all pairs); a pair counts when
its pHashes are within ``radius`` and no channel of any cell of its 4 × 4 colour grids differs by more than
``max_color_difference`` (pHash is blind to hue). Pairs join into groups (connected components); each group keeps one row by the keep policy
of dedup_exact and filters the others with ``dedup:phash``, pointing at the survivor.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup import DEFAULT_RADIUS, color_differences, groups_of, phash_pairs, removals
from curate.stage import GlobalStage, StageConfig
from curate.stages.dedup_exact import KEEP_POLICY_COLUMNS, keep_policy_inputs

REASON = "dedup:phash"


class DedupPhashConfig(StageConfig):
    stage: Literal["dedup_phash"] = "dedup_phash"
    radius: int = Field(DEFAULT_RADIUS, ge=0, le=32, description="largest Hamming distance between duplicates' "
                        "64-bit pHashes (8 finds JPEG re-encodes, resizes and most 5% crops; see benchmarks/dedup.py)")
    max_color_difference: float = Field(28.0, ge=0, le=255, description="largest difference of any channel of any "
                                        "cell of the 4 × 4 RGB grids (0-255): a 10% brighter copy differs by about "
                                        "23, the same shape in another colour by 30 or more")
    seed: int = Field(0, description="seed of the banding tables' bit samples")


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

    def decide(self, metadata: pa.Table) -> pa.Table:
        config: DedupPhashConfig = self.config  # type: ignore[assignment]
        hashed = metadata.filter(pc.is_valid(metadata.column("phash")))
        codes = hashed.column("phash").to_numpy(zero_copy_only=False).astype(np.int64)
        left, right = phash_pairs(codes, radius=config.radius, seed=config.seed)
        close = color_differences(hashed.column("color_signature").to_pylist(), left, right)
        keep = close <= config.max_color_difference
        labels = groups_of(hashed.num_rows, left[keep], right[keep])
        scores, pixels = keep_policy_inputs(hashed)
        return removals(hashed.column("uid").to_pylist(), labels, scores, pixels, REASON)
