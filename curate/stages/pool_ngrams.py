"""Metadata entries from the pool's own captions: the word n-grams that many rows share (MetaCLIP's lists are
Wikipedia's frequent n-grams; a pool from a domain Wikipedia barely covers has its own vocabulary).

Counted exactly as a shuffle: each map task counts, for the rows it reads, the rows each n-gram occurs in (once per
row), and sends each n-gram to the reduce task its hash names; a reduce task sums its share and returns only the
n-grams in ``min_rows`` rows or more. No task holds the whole pool's vocabulary, and the driver receives only the
frequent n-grams, at most ``max_entries`` of them (the most frequent).

Tokens are runs of letters and digits, lowercased (the matcher's whole-word rule then finds the n-gram as it was
counted). An n-gram may not start or end with a function word, a single character or a number: ``of the``, ``a``,
``2019 red`` would match everything or nothing that matters.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from curate.stages.metadata_entries import FUNCTION_WORDS, MAX_ENTRY_CHARS

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.core.pool import Pool

TOKEN = re.compile(r"[^\W_]+")
NGRAMS_PER_TASK = 2_000_000  # distinct (task, n-gram) counts one reduce task sums, about


class PoolNgrams(BaseModel):
    """balance.pool_ngrams: the pool's frequent word n-grams as metadata entries."""

    model_config = ConfigDict(extra="forbid")

    max_words: int = Field(2, ge=1, le=4, description="longest n-gram, in words (MetaCLIP: unigrams and bigrams)")
    min_rows: int = Field(5, ge=2, description="an n-gram is an entry when at least this many live rows' captions "
                          "hold it")
    max_entries: int = Field(500_000, ge=1, description="keep at most this many, the most frequent (MetaCLIP's "
                             "list has about 500k)")


@dataclass(frozen=True)
class NgramJob:
    max_words: int
    min_rows: int
    partitions: int


def caption_ngrams(caption: str | None, max_words: int) -> set[str]:
    """The distinct n-grams of ``caption`` that may be entries."""
    if not caption:
        return set()
    words = TOKEN.findall(caption.lower())
    found = set()
    for n in range(1, max_words + 1):
        for start in range(len(words) - n + 1):
            first, last = words[start], words[start + n - 1]
            if _weak(first) or _weak(last):
                continue
            gram = " ".join(words[start:start + n])
            if len(gram) <= MAX_ENTRY_CHARS:
                found.add(gram)
    return found


def _weak(word: str) -> bool:
    return len(word) < 2 or word in FUNCTION_WORDS or word.isdigit()


def _ngrams_to_owners(job: NgramJob, table: pa.Table) -> list[dict[str, int]]:
    """Map: the rows each n-gram occurs in among these rows, cut by the reduce task that owns the n-gram."""
    counts: Counter[str] = Counter()
    for caption in table.column("caption").to_pylist():
        counts.update(caption_ngrams(caption, job.max_words))
    pieces: list[dict[str, int]] = [{} for _ in range(job.partitions)]
    for gram, count in counts.items():
        pieces[zlib.crc32(gram.encode()) % job.partitions][gram] = count
    return pieces


def _frequent_ngrams(job: NgramJob, partition: int, pieces: list[dict[str, int]]) -> dict[str, int]:
    """Reduce: this task's n-grams summed over the pool, those in ``min_rows`` rows or more."""
    total: Counter[str] = Counter()
    for piece in pieces:
        total.update(piece)
    return {gram: count for gram, count in total.items() if count >= job.min_rows}


def pool_ngram_entries(pool: Pool, settings: PoolNgrams) -> list[str]:
    """The pool's frequent n-grams, the ``max_entries`` most frequent (ties by the n-gram), sorted."""
    # a caption holds a few dozen candidate n-grams; most of the vocabulary is rare, so budget for every row's
    partitions = pool.partitions(pool.rows * 8 * settings.max_words, NGRAMS_PER_TASK)
    job = NgramJob(settings.max_words, settings.min_rows, partitions)
    found: dict[str, int] = {}
    for part in pool.shuffle(_ngrams_to_owners, _frequent_ngrams, job, ["caption"], partitions,
                             bytes_per_row=40 * 8 * settings.max_words):
        found.update(part)
    ranked = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[: settings.max_entries]
    return sorted(gram for gram, _ in ranked)
