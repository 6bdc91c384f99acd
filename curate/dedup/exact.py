"""Exact duplicates: rows whose digest (sha256 of the bytes, of the pixels) is equal, as a shuffle by digest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from curate.dedup import bands
from curate.dedup.bands import joined, mix, split_by_owner

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.core.pool import Pool


@dataclass(frozen=True)
class DigestJob:
    """The digest columns compared (each within itself) and the reduce partitions they are shuffled into."""

    columns: list[str]
    partitions: int


def _digests_to_owners(job: DigestJob, table: pa.Table) -> list[list[np.ndarray]]:
    """Map: each (row, digest column) to the reduce task owning the digest, as (row, column, 128-bit hash)."""
    import hashlib

    import pyarrow.compute as pc

    columns, partitions = job.columns, job.partitions
    entries = []
    for index, name in enumerate(columns):
        present = table.filter(pc.is_valid(table.column(name)))
        digests = present.column(name).to_pylist()
        # a 128-bit hash of the whole digest string, whatever its format: equal only for equal digests (but 2^-128)
        prefix = np.frombuffer(b"".join(hashlib.blake2b(d.encode(), digest_size=16).digest() for d in digests),
                               dtype="<u8").reshape(-1, 2).astype(np.int64)
        entries.append(np.column_stack([present.column("row").to_numpy().astype(np.int64),
                                        np.full(len(digests), index, np.int64), prefix]))
    entries_all = np.concatenate(entries) if entries else np.zeros((0, 4), np.int64)
    owner = (mix(entries_all[:, 2] ^ entries_all[:, 1], 7) % np.uint64(partitions)).astype(np.intp)
    return [piece[0] for piece in split_by_owner(owner, [entries_all], partitions)]


def _equal_digest_pairs(job: DigestJob, partition: int, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reduce: rows sharing a digest (in the same column), each chained to the smallest row holding it."""
    entries = np.concatenate(pieces) if pieces else np.zeros((0, 4), np.int64)
    entries = entries[np.lexsort((entries[:, 0], entries[:, 3], entries[:, 2], entries[:, 1]))]
    new = np.ones(len(entries), dtype=bool)
    new[1:] = (entries[1:, 1:] != entries[:-1, 1:]).any(axis=1)
    holder = entries[new, 0][np.cumsum(new) - 1]
    return holder[~new], entries[~new, 0]


def exact_pair_rows(pool: Pool, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows with equal digests in one of ``columns`` (compared by a 128-bit hash), shuffled by digest."""
    partitions = pool.partitions(pool.rows * len(columns), bands.ENTRIES_PER_TASK)
    job = DigestJob(list(columns), partitions)
    return joined(pool.shuffle(_digests_to_owners, _equal_digest_pairs, job, list(columns), partitions,
                               bytes_per_row=32 * len(columns)))
