"""Concept balancing (MetaCLIP): flatten the head of the concept distribution, keep its tail.

Each caption is matched against metadata entries (a file, WordNet's nouns, the pool's own frequent n-grams;
curate.stages.metadata_entries, curate.stages.pool_ngrams). An
entry matched by at most ``max_per_entry`` live rows (MetaCLIP's t) keeps all of them; one matched by ``n > t`` rows
keeps each with probability ``t / n``. A row survives if any of its entries keeps it, so a row that also names a
rare concept is never lost to a common one; the others are filtered with ``balance:over_represented``. Rows whose
caption matches no entry are dropped with ``balance:no_entry`` (MetaCLIP's choice) unless ``no_entry: keep``.

The draw for (row, entry) is a hash of the uid, the entry and ``seed``: a rerun decides the same. Counting and
deciding are two passes over the stored captions, in tasks; the driver holds one count per entry. Each entry's live
rows before balancing and the rows kept after are stored as OUT/decisions/balance_entries.parquet: the report plots
the distribution from it and `curate why` names a row's entries with their counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.config import StageConfig
from curate.core.stage import GlobalStage, Removals
from curate.stages.metadata_entries import build_matcher, matched_entries, read_entries
from curate.stages.pool_ngrams import PoolNgrams, pool_ngram_entries

if TYPE_CHECKING:
    from curate.core.pool import Pool

OVER_REPRESENTED = "balance:over_represented"
NO_ENTRY = "balance:no_entry"
NAMED_ENTRIES = 8  # entries named in a removed row's ledger column, at most
ENTRY_TABLE = "balance_entries"  # OUT/decisions/balance_entries.parquet: entry, rows (before), kept (after)


class BalanceConfig(StageConfig):
    stage: Literal["balance"] = "balance"
    entries: str | None = Field(None, description="a text file of metadata entries, one per line")
    wordnet: str | None = Field(None, description="a WordNet folder holding index.noun, whose noun lemmas are "
                                "entries (Debian's wordnet-base installs /usr/share/wordnet)")
    pool_ngrams: PoolNgrams | None = Field(None, description="the pool's own frequent word n-grams as entries, "
                                           "counted over the live captions ({} for the defaults)")
    max_per_entry: int = Field(20_000, ge=1, description="MetaCLIP's t: an entry matched by more live rows keeps "
                               "about this many of them (20k for 400M pairs; scale it with the pool)")
    no_entry: Literal["drop", "keep"] = Field("drop", description="rows whose caption matches no entry: drop them "
                                              "(balance:no_entry, as MetaCLIP does) or keep them")
    seed: int = Field(0, description="the draws are a hash of uid, entry and seed: change it for another sample")

    @model_validator(mode="after")
    def _has_entries(self) -> BalanceConfig:
        if not self.entries and not self.wordnet and self.pool_ngrams is None:
            raise ValueError("balance needs metadata entries: entries: a text file, wordnet: a WordNet folder, "
                             "pool_ngrams: the pool's frequent n-grams ({} for the defaults), or several")
        return self


class BalanceFilter(GlobalStage[BalanceConfig]):
    name = "balance"
    Config = BalanceConfig
    fans_out: ClassVar[bool] = True  # counts and draws in tasks beside the stored captions
    entry_table: pa.Table | None = None  # set by decide_pool: each entry's live rows and kept rows

    def inputs(self) -> list[str]:
        return ["caption"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {"balance_entries": pa.string()}

    def decide_pool(self, pool: Pool) -> Removals:
        config: BalanceConfig = self.config
        grams = pool_ngram_entries(pool, config.pool_ngrams) if config.pool_ngrams is not None else []
        entries = read_entries(config.entries, config.wordnet, grams)
        matcher = build_matcher(entries)
        counts = np.zeros(len(entries), dtype=np.int64)
        for indexes, found in pool.map(_count_entries, matcher, ["caption"]):
            np.add.at(counts, indexes, found)
        job = BalanceJob(matcher, counts, config.max_per_entry, config.no_entry == "drop", config.seed)
        rows, uids, reasons, named = [], [], [], []
        kept = np.zeros(len(entries), dtype=np.int64)
        for part in pool.map(_balance_rows, job, ["uid", "caption"]):
            rows += part[0]
            uids += part[1]
            reasons += part[2]
            named += ["|".join(entries[i] for i in ids[:NAMED_ENTRIES]) or None for ids in part[3]]
            np.add.at(kept, part[4][0], part[4][1])
        present = np.flatnonzero(counts)  # entries no live caption holds say nothing about this pool
        self.entry_table = pa.table({"entry": pa.array([entries[i] for i in present], pa.string()),
                                     "rows": pa.array(counts[present]), "kept": pa.array(kept[present])})
        return Removals.of(uids, reasons, rows=rows, balance_entries=named)

    def tables(self) -> dict[str, pa.Table]:
        return {ENTRY_TABLE: self.entry_table} if self.entry_table is not None else {}


def _count_entries(matcher, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Map: how many of these rows each matched entry appears in (entry indexes, counts)."""
    found = [i for caption in table.column("caption").to_pylist() for i in matched_entries(matcher, caption)]
    indexes, counts = np.unique(np.asarray(found, dtype=np.int64), return_counts=True)
    return indexes, counts


@dataclass(frozen=True)
class BalanceJob:
    """What a deciding task needs: the matcher, every entry's count over the live pool, t, the no-entry rule and
    the seed of the draws."""

    matcher: object
    counts: np.ndarray
    max_per_entry: int
    drop_no_entry: bool
    seed: int


def _balance_rows(job: BalanceJob, table: pa.Table) -> tuple[list[int], list[str], list[str], list[list[int]],
                                                            tuple[np.ndarray, np.ndarray]]:
    """Map: the (rows, uids, reasons, matched entries) of the rows balancing removes, and (entry indexes, rows
    kept) of the entries the kept rows hold."""
    rows, uids, reasons, named, kept = [], [], [], [], []
    for row, uid, caption in zip(table.column("row").to_pylist(), table.column("uid").to_pylist(),
                                 table.column("caption").to_pylist()):
        ids = matched_entries(job.matcher, caption)
        if ids and any(_kept_by(job, uid, i) for i in ids) or not ids and not job.drop_no_entry:
            kept += ids
            continue
        rows.append(row)
        uids.append(uid)
        reasons.append(OVER_REPRESENTED if ids else NO_ENTRY)
        named.append(ids)
    indexes, counts = np.unique(np.asarray(kept, dtype=np.int64), return_counts=True)
    return rows, uids, reasons, named, (indexes, counts)


def _kept_by(job: BalanceJob, uid: str, entry: int) -> bool:
    count = int(job.counts[entry])
    if count <= job.max_per_entry:
        return True
    digest = hashlib.blake2b(f"{job.seed}:{uid}:{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < job.max_per_entry / count
