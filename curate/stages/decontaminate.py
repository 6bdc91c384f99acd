"""Eval decontamination: pool rows that duplicate any eval image are filtered with ``dedup:eval_contamination``.

A model trained on a pool that holds its benchmark's images scores what it memorised. The eval images (a folder, WebDataset
shards, or a parquet with ``image_path``) go through the pipeline's own per-sample stages — the same decode, resize,
hashes and embedding model as the pool — so they are compared like for like: equal original bytes or decoded pixels,
pHashes within ``phash_radius`` whose colour grids agree, and, when the pipeline stores embeddings of one model,
cosine at or above ``semantic_threshold``. ``duplicate_of`` names the eval item (``eval:<file or key>``) and
``eval_match`` how it matched (``sha256``, ``pixel_sha256``, ``phash`` or ``embedding``): both reach the ledger.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup.bands import DEFAULT_RADIUS, MAX_RADIUS, phash_pair_rows
from curate.inputs.image_sets import image_set_rows
from curate.dedup.groups import color_differences
from curate.core.pool import Pool
from curate.dedup.semantic import unit_rows
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

REASON = "dedup:eval_contamination"


class DecontaminateConfig(StageConfig):
    stage: Literal["decontaminate"] = "decontaminate"
    eval: str = Field(description="eval images: a folder of image files, .tar shards (folder or glob), or a parquet "
                      "with an image_path column (relative to the parquet)")
    exact: bool = Field(True, description="compare original bytes and decoded pixels")
    phash_radius: int | None = Field(DEFAULT_RADIUS, ge=0, le=MAX_RADIUS, description="null: no perceptual comparison")
    max_color_difference: float = Field(28.0, ge=0, le=255)
    semantic_threshold: float | None = Field(0.95, gt=0, le=1, description="null: no embedding comparison")


def eval_rows(spec: str) -> pa.Table:
    """The eval set as input rows whose image the download stage reads from a local file."""
    return image_set_rows(spec, "eval", "decontaminate.eval")


class Decontaminate(GlobalStage[DecontaminateConfig]):
    name = "decontaminate"
    Config = DecontaminateConfig
    fans_out = True

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.evals: pa.Table | None = None

    def inputs(self) -> list[str]:
        return ["sha256", "phash", "color_signature"]

    def optional_inputs(self) -> list[str]:
        return ["pixel_sha256", "image_embedding", "clip_model"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string(), "eval_match": pa.string()}

    def outside_rows(self) -> pa.Table:
        """The eval images, which the runner sends through the pipeline's per-sample stages in its workers."""
        return eval_rows(self.config.eval)

    def receive_outside(self, table: pa.Table) -> None:
        self.evals = table

    def decide_pool(self, pool: Pool) -> Removals:
        """Eval fingerprints are small: they travel to tasks over the pool's parts (the pHash search is the pool's
        shuffle with the eval codes added to each reduce task). The first match of a row wins: bytes or pixels,
        then pHash, then embeddings."""
        config: DecontaminateConfig = self.config
        evals = self.evals
        if evals is None:
            raise RuntimeError("decontaminate: its eval images were not run through the per-sample stages "
                               "(curate.core.runner.run_outside_rows runs them before deciding)")
        matched: dict[int, tuple[str, str]] = {}  # pool row → (eval uid, how it matched)
        digests = [c for c in ("sha256", "pixel_sha256") if config.exact and pool.has(c) and c in evals.column_names]
        if digests and evals.num_rows:
            targets = {c: {d: u for d, u in zip(evals.column(c).to_pylist(), evals.column("uid").to_pylist()) if d}
                       for c in digests}
            for rows, uids, how in pool.map(_match_digests, targets, digests):
                for row, uid, column in zip(rows, uids, how):
                    matched.setdefault(row, (uid, column))
        if config.phash_radius is not None and evals.num_rows and pool.has("phash"):
            by_phash: dict[int, str] = {}
            self._match_phash(pool, evals, config, by_phash)
            for row, uid in by_phash.items():
                matched.setdefault(row, (uid, "phash"))
        if config.semantic_threshold is not None and pool.has("image_embedding") \
                and "image_embedding" in evals.column_names:
            targets = _eval_vectors(evals)
            if targets:
                for rows, uids in pool.map(_match_embeddings, (targets, config.semantic_threshold),
                                           ["clip_model", "image_embedding"]):
                    for row, uid in zip(rows, uids):
                        matched.setdefault(row, (uid, "embedding"))
        uids = pool.lookup(np.array(sorted(matched), dtype=np.int64), [])
        rows = uids.column("row").to_pylist()
        return Removals.of(uids.column("uid").to_pylist(), REASON, rows=rows,
                           duplicate_of=[matched[r][0] for r in rows], eval_match=[matched[r][1] for r in rows])

    @staticmethod
    def _match_phash(pool: Pool, evals: pa.Table, config: DecontaminateConfig, matched: dict[int, str]) -> None:
        """Pool and eval codes banded together (eval items as rows -1, -2, ...); pairs that cross count. The search
        links each distinct code through one row (the smallest pool row holding it) and chains the other rows with
        that code to it: every pool row and every eval item sharing the paired codes is compared, each pair after
        its own colour check."""
        hashed = evals.filter(pc.is_valid(evals.column("phash")))
        codes = hashed.column("phash").to_numpy(zero_copy_only=False).astype(np.int64)
        left, right = phash_pair_rows(pool, radius=config.phash_radius or 0, outside=codes)
        crossing = (left < 0) & (right >= 0)
        evals_of, holders = -1 - left[crossing], right[crossing]
        if not len(holders):
            return
        within = (left >= 0) & np.isin(left, holders)  # pool pairs that start at a matched row
        info = pool.lookup(np.concatenate([holders, right[within]]), ["phash", "color_signature"])
        info_rows = info.column("row").to_numpy()
        code_of = info.column("phash").to_numpy(zero_copy_only=False)
        chain_from, chain_to = left[within], right[within]
        same = code_of[np.searchsorted(info_rows, chain_from)] == code_of[np.searchsorted(info_rows, chain_to)]
        chain_from, chain_to = chain_from[same], chain_to[same]
        order = np.argsort(chain_from, kind="stable")
        chain_from, chain_to = chain_from[order], chain_to[order]
        first, last = np.searchsorted(chain_from, holders, "left"), np.searchsorted(chain_from, holders, "right")
        more = last - first  # each crossing pair, plus one pair per row chained to its pool row
        rows = np.concatenate([holders, chain_to[np.concatenate([np.arange(a, b) for a, b in zip(first, last)])
                                                 if more.sum() else np.zeros(0, np.int64)]])
        eval_index = np.concatenate([evals_of, np.repeat(evals_of, more)])
        by_code = np.argsort(codes, kind="stable")  # and every eval item with the same code as the one paired
        low = np.searchsorted(codes[by_code], codes[eval_index], "left")
        high = np.searchsorted(codes[by_code], codes[eval_index], "right")
        rows = np.repeat(rows, high - low)
        eval_index = by_code[np.concatenate([np.arange(a, b) for a, b in zip(low, high)])]
        at = np.searchsorted(info_rows, rows)
        signatures = info.column("color_signature").to_pylist() + hashed.column("color_signature").to_pylist()
        close = color_differences(signatures, at, info.num_rows + eval_index) <= config.max_color_difference
        eval_uids = hashed.column("uid").to_pylist()
        for row, index in sorted(zip(rows[close].tolist(), eval_index[close].tolist())):
            matched.setdefault(row, eval_uids[index])


def _match_digests(targets: dict[str, dict[str, str]],
                   table: pa.Table) -> tuple[list[int], list[str], list[str]]:
    """Rows whose digest is an eval item's: the rows, the eval uids and which digest matched."""
    rows, uids, how = [], [], []
    for column, by_digest in targets.items():
        for row, digest in zip(table.column("row").to_pylist(), table.column(column).to_pylist()):
            if digest in by_digest:
                rows.append(row)
                uids.append(by_digest[digest])
                how.append(column)
    return rows, uids, how


def _eval_vectors(evals: pa.Table) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per scoring model, the eval images' unit embeddings and uids."""
    embedded = evals.filter(pc.is_valid(evals.column("image_embedding")))
    out = {}
    for model in sorted(set(embedded.column("clip_model").to_pylist()) - {None}):
        rows = embedded.filter(pc.equal(embedded.column("clip_model"), model))
        out[model] = (unit_rows(rows.column("image_embedding")), rows.column("uid").to_pylist())
    return out


def _match_embeddings(job: tuple[dict[str, tuple[np.ndarray, list[str]]], float],
                      table: pa.Table) -> tuple[list[int], list[str]]:
    """Each pool row against its nearest eval image of the same model (faiss inner product on unit vectors)."""
    import faiss

    targets, threshold = job
    rows, uids = [], []
    embedded = table.filter(pc.is_valid(table.column("image_embedding")))
    for model, (vectors, eval_uids) in targets.items():
        chosen = embedded.filter(pc.equal(embedded.column("clip_model"), model))
        if not chosen.num_rows:
            continue
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        similarity, nearest = index.search(unit_rows(chosen.column("image_embedding")), 1)
        for row, sim, j in zip(chosen.column("row").to_pylist(), similarity[:, 0], nearest[:, 0]):
            if sim >= threshold:
                rows.append(row)
                uids.append(eval_uids[int(j)])
    return rows, uids
