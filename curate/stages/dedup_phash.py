"""Perceptual duplicates: rows whose content hashes are within ``radius`` bits and whose thumbnails then agree.

Candidates come from multi-index hashing and banding over the stored hashes (curate.dedup.bands: a shuffle by hash band
across tasks, never all pairs). Each row takes part with the hashes of its content box, of the box's centre 90% and
80% (a copy cropped 5-10% a side), optionally of the mirrored box, the box's mean hash (ink per cell: steady
where the DCT signs of symmetric line art flip) and the whole image (curate.dedup.fingerprints).
A candidate becomes a link only if an independent second check agrees: the two rows' content thumbnails, one
registered onto the other, differ by at most ``max_difference`` in every block, and their colour grids by at most
``max_color_difference`` (pHash is blind to hue). Without the check, degenerate hashes (near-white line art, small
drawings in large margins) merged unrelated pictures: on the development pool 31% of this tier's removals pointed at
a different picture (benchmarks/efficacy.py). Links join rows into groups (connected components); each group keeps
one row by the keep policy of dedup_exact and filters the others with ``dedup:phash``, pointing at the survivor.

Runs stored before the content fingerprints existed (a part without the ``content_*`` columns), and ``content:
false``, are decided as before: whole-image pHashes within ``radius`` whose 4 × 4 colour grids agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.dedup.bands import DEFAULT_BITS, DEFAULT_RADIUS, MAX_RADIUS, phash_pair_rows
from curate.dedup.groups import KEEP_POLICY_COLUMNS, color_grid, decide_groups
from curate.dedup.content import content_candidates, verified_links
from curate.dedup.groups import uid_ranks
from curate.core.pool import Pool
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

REASON = "dedup:phash"
CONTENT_COLUMNS = ("content_phash", "content_thumbnail", "content_colors")


class DedupPhashConfig(StageConfig):
    stage: Literal["dedup_phash"] = "dedup_phash"
    radius: int = Field(DEFAULT_RADIUS, ge=0, le=MAX_RADIUS, description="largest Hamming distance between "
                        "candidates' 64-bit pHashes (8 finds re-encodes, resizes, borders and most 5-10% crops on the "
                        "development pool; 10 adds a few crops and costs more tables; above 12 the banding search "
                        "needs thousands of tables)")
    max_difference: float = Field(11.0, ge=0, le=255, description="largest mean difference of any 4 × 4 pixel "
                                  "block of two candidates' registered 32 × 32 content thumbnails (contrast-"
                                  "normalised, 0-255 scale). On the development pool 11 leaves 83% of duplicate "
                                  "groups with one survivor while 4.7% of removals point at a different picture (the "
                                  "issue's 5-copy protocol: 90% and 2.2%); 13 gives 83% and 6.0% (93% and 3.1%), 15 "
                                  "83% and 7.2% (94% and 4.1%). What is still merged is near-identical designs (skin-"
                                  "tone and gender variants of one emoji, flags that differ by a shade); what is still "
                                  "missed is mostly mirrored copies (benchmarks/efficacy.py)")
    content: bool = Field(True, description="use the content fingerprints when the pool stores them; false: "
                          "whole-image pHashes and colour grids only, as before them (for comparison)")
    mirror: bool = Field(False, description="also link mirrored copies. Off by default: on drawings and symbols "
                         "mirror images are often different pictures (< and >, b and d, a clock at 2 and at 10); on "
                         "the development pool it links more of the mirrored copies but raises the removals that "
                         "point at a different picture to 6.1%")
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


class DedupPhash(GlobalStage[DedupPhashConfig]):
    name = "dedup_phash"
    Config = DedupPhashConfig
    fans_out = True

    def inputs(self) -> list[str]:
        return ["phash", "color_signature"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def optional_inputs(self) -> list[str]:
        return [*KEEP_POLICY_COLUMNS, *CONTENT_COLUMNS]

    def decide_pool(self, pool: Pool) -> Removals:
        config: DedupPhashConfig = self.config
        # parts hashed before the content fingerprints (kept on resume) have none: the whole pool takes the
        # whole-image path then, rather than a search that misses their rows
        if config.content and all(pool.has_everywhere(c) for c in CONTENT_COLUMNS):
            left, right, centre, mirrored = content_candidates(pool, config.radius, config.bits, config.seed,
                                                               config.mirror)
            return Removals(decide_groups(pool, left, right, REASON, ["content_thumbnail", "content_colors"], verified_links(
                config.max_difference, config.max_color_difference, centre, mirrored)))
        left, right = phash_pair_rows(pool, radius=config.radius, bits=config.bits, seed=config.seed)
        return Removals(decide_groups(pool, left, right, REASON, ["phash", "color_signature"],
                                      colour_links(config.max_color_difference)))
