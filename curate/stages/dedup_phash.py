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

from curate.dedup import (DEFAULT_BITS, DEFAULT_RADIUS, KEEP_POLICY_COLUMNS, MAX_RADIUS, color_grid, decide_groups,
                          phash_pair_rows, uid_ranks)
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
    bits: int = Field(DEFAULT_BITS, ge=16, le=32, description="bits of a banding key (the band's and random others). "
                      "At radius 8 and 24 bits a code meets about rows / 8M unrelated codes per table: nothing below "
                      "10M rows, 12 at 100M (12× the checks). Each bit more halves that and needs more tables (26 "
                      "at 24 bits, 41 at 26, 66 at 28)")


def colour_links(limit: float):
    """The pHash tier's edges, colour-checked (pHash is blind to hue, the 4 × 4 colour grids are not).

    The search returns each distinct code once, as its smallest row, with the other rows of that code chained to
    it. A chain or a near pair through a row of another colour must not decide for the rest, so the rows of one
    code are first split into colour classes (in uid order, each row joins the first class whose leader's colours
    agree with its own), and near pairs of codes link the classes of the two codes whose leaders agree."""
    def links(info: pa.Table, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grid = color_grid(info.column("color_signature").to_pylist())
        codes = info.column("phash").to_numpy(zero_copy_only=False)

        def agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.abs(grid[a] - grid[b]).max(axis=1) <= limit if len(a) else np.zeros(0, bool)

        uid_rank = uid_ranks(info.column("uid").to_pylist())
        order = np.lexsort((uid_rank, codes))
        starts = np.flatnonzero(np.concatenate([[True], codes[order][1:] != codes[order][:-1]]))
        group_of = np.empty(len(codes), np.int64)
        group_of[order] = np.cumsum(np.isin(np.arange(len(order)), starts)) - 1
        first = order[starts][group_of]  # each row's code's first row in uid order
        leader = np.where(agree(np.arange(len(codes)), first), first, -1)
        classes: dict[int, list[int]] = {g: [int(order[a])] for g, a in enumerate(starts)}
        for row in np.flatnonzero(leader < 0)[np.argsort(uid_rank[leader < 0])].tolist():
            group = classes[int(group_of[row])]  # a row of another colour than its code's first row
            match = np.flatnonzero(np.abs(grid[group] - grid[row]).max(axis=1) <= limit)
            leader[row] = group[match[0]] if len(match) else row
            if not len(match):
                group.append(row)  # a new class
        near = codes[left] != codes[right]
        code_pairs = np.unique(np.stack([group_of[left[near]], group_of[right[near]]], 1), axis=0)
        split = np.array([len(classes[g]) > 1 for g in range(len(starts))], dtype=bool)
        plain = ~(split[code_pairs[:, 0]] | split[code_pairs[:, 1]])  # one class each: their first rows
        a = [order[starts][code_pairs[plain, 0]]]
        b = [order[starts][code_pairs[plain, 1]]]
        for g, h in code_pairs[~plain].tolist():
            a.append(np.repeat(classes[g], len(classes[h])))
            b.append(np.tile(classes[h], len(classes[g])))
        a, b = np.concatenate(a).astype(np.int64), np.concatenate(b).astype(np.int64)
        joined = agree(a, b)
        members = np.flatnonzero(leader != np.arange(len(codes)))
        return np.concatenate([members, a[joined]]), np.concatenate([leader[members], b[joined]])
    return links


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
        left, right = phash_pair_rows(pool, radius=config.radius, bits=config.bits, seed=config.seed)
        return decide_groups(pool, left, right, REASON, ["phash", "color_signature"],
                             colour_links(config.max_color_difference))
