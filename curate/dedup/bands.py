"""Near-duplicate pHash pairs over the pool: multi-index hashing and banding, as a shuffle of Ray tasks.

Each tier is a shuffle over the pool (curate.core.pool, curate.core.fan_out): map tasks read groups of stored parts and send
each row to the reduce task that owns its key; a reduce task finds the pairs among the rows it got; the driver
receives pairs of row ids, joins them into groups and applies the keep policy to the rows in some pair. No process
holds the whole pool's fingerprints.

pHash: multi-index hashing cuts the 64 bits into ``radius + 1`` bands, so two codes within ``radius`` bits agree
exactly on at least one band; a code is sent once per band, keyed by (band, the band's bits), and codes that may be
duplicates meet in the reduce task owning that key. Inside it, candidates come from banding (locality-sensitive
hashing on bit samples): each table keys a code by the band's bits plus a fixed random sample of the other bits, to
``bits`` bits in all, and codes sharing a key in any table are checked exactly (popcount of the XOR). Two codes ``d``
bits apart that agree on a band share a table's key with probability C(64-w-d, bits-w)/C(64-w, bits-w) (w: the
band's width), so near codes almost surely meet and far ones almost never do; work grows with the number of codes,
not with its square; the driver keeps a pair found in several bands once. With 24-bit keys a bucket
holds about one code in 16 million: up to tens of millions of codes per reduce task the cost is linear-ish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from curate.core.fan_out import task_count

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.core.pool import Pool


DEFAULT_RADIUS = 8
MAX_RADIUS = 12  # above it the tables per band grow into the thousands (tables_for(16) = 1756)
DEFAULT_BITS = 24  # at most 32: keys are uint32
TABLE_RECALL = 0.97  # the share of pairs exactly `radius` bits apart that meet in some table (nearer ones: more)
CHUNK = 1 << 20  # candidate pairs checked per numpy pass: bounds the memory of a pass to a few dozen MB
ENTRIES_PER_TASK = 4_000_000  # (row, code, band) entries a pHash reduce task gets: ~100 MB, ~300 MB working
SEARCH_BATCH = 100_000  # distinct codes searched at once inside a reduce task (see _near_pairs_by_band_value)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64))).astype(np.int64)


def bands(radius: int) -> list[np.ndarray]:
    """The ``radius + 1`` bands of contiguous bit positions: codes within ``radius`` bits agree on one at least."""
    return np.array_split(np.arange(64), radius + 1)


def band_recall(radius: int, tables: int, bits: int = DEFAULT_BITS) -> float:
    """The probability that two codes exactly ``radius`` bits apart share a key in some table of some band they
    agree on. Given which bands are clean (no differing bit), each table of a clean band of width w misses with
    probability 1 - C(64-w-r, k-w)/C(64-w, k-w), k = max(bits, w); the expectation over the clean bands sums, by
    inclusion-exclusion, over how many narrow and wide bands are assumed clean."""
    from math import comb

    widths = [len(b) for b in bands(radius)]
    narrow, wide = min(widths), max(widths)
    counts = (widths.count(narrow), widths.count(wide)) if narrow != wide else (len(widths), 0)

    def miss(width: int) -> float:
        key = max(bits, width)
        if radius + key > 64:
            return 0.0 if key == width else 1.0  # a key of the whole band always meets; else never
        return (1 - comb(64 - width - radius, key - width) / comb(64 - width, key - width)) ** tables

    expected = 0.0
    for a in range(counts[0] + 1):
        for b in range(counts[1] + 1):
            clean_bits = a * narrow + b * wide
            if 64 - clean_bits < radius:
                continue
            expected += (comb(counts[0], a) * comb(counts[1], b) * (miss(narrow) - 1) ** a * (miss(wide) - 1) ** b
                         * comb(64 - clean_bits, radius) / comb(64, radius))
    return 1.0 - expected


def tables_for(radius: int, bits: int = DEFAULT_BITS, recall: float = TABLE_RECALL) -> int:
    """Tables per band needed so that codes ``radius`` bits apart meet with probability ``recall``."""
    if radius == 0 or max(len(b) for b in bands(radius)) >= bits:
        return 1  # a key of the band itself: every code that agrees on it is a candidate
    tables = 1
    while band_recall(radius, tables, bits) < recall:
        tables += 1
    return tables


def band_tables(radius: int, tables: int, bits: int, seed: int) -> list[list[np.ndarray]]:
    """Per band, the bit positions of each table's key: the band's bits plus a seeded sample of the others."""
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = []
    for band in bands(radius):
        others = np.setdiff1d(np.arange(64), band)
        extra = max(0, min(bits, 32) - len(band))
        out.append([np.sort(np.concatenate([band, rng.choice(others, size=extra, replace=False)])).astype(np.uint64)
                    for _ in range(tables if extra else 1)])
    return out


def _table_keys(code_bytes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The code's bits at ``positions``, packed into one integer per code (a bit-gather, as x86's PEXT): per byte of
    the code, a 256-entry table holds what that byte contributes to the key, so a key costs 8 lookups, not a shift
    per bit. ``code_bytes`` holds the codes' bytes as 8 contiguous rows of n (least significant byte first)."""
    keys = np.zeros(code_bytes.shape[1], dtype=np.uint32)
    values = np.arange(256, dtype=np.uint32)
    for byte in range(8):
        table = np.zeros(256, dtype=np.uint32)
        for out_bit, position in enumerate(positions.tolist()):
            if position // 8 == byte:
                table |= ((values >> np.uint32(position % 8)) & np.uint32(1)) << np.uint32(out_bit)
        if table.any():
            keys |= table[code_bytes[byte]]
    return keys


def _pairs_within_buckets(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of codes that share a key, as index arrays (each pair once).

    Most codes share their key with no other: a counting pass (over the key hashed to about 4 bins per code) finds
    the few that might, and only those are sorted. Sorting every key of every table cost more than all the rest.
    The hash (Fibonacci hashing: the top bits of key × 2^32/φ) mixes every bit of the key into the bin: the keys of
    one reduce task share few band values, so their low bits alone would crowd the bins."""
    shift = 32 - min(32, max(4, int(np.ceil(np.log2(4 * max(1, len(keys)))))))
    bins = 1 << (32 - shift)
    folded = ((keys * np.uint32(0x9E3779B1)) >> np.uint32(shift)).astype(np.intp)
    shared = np.bincount(folded, minlength=bins) >= 2  # one byte per bin: the gather below stays in cache longer
    crowded = np.flatnonzero(shared[folded])
    order = crowded[np.argsort(keys[crowded])]
    sorted_keys = keys[order]
    left, right = [], []
    offset = 1
    same = sorted_keys[offset:] == sorted_keys[:-offset]
    while same.any():  # pass d pairs each code with the one d places on, while some bucket is that long
        index = np.flatnonzero(same)
        left.append(order[index])
        right.append(order[index + offset])
        offset += 1
        same = sorted_keys[offset:] == sorted_keys[:-offset] if offset < len(order) else np.zeros(0, bool)
    if not left:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(left), np.concatenate(right)


def _near_pairs_in_tables(unique: np.ndarray, job: tuple[list[np.ndarray], int]) -> np.ndarray:
    """One part of the banding search: the pairs of ``unique`` codes that share a key in any of these tables and are
    within ``radius``, packed as ``i * n + j`` (i < j), each once. Memory beyond the shared codes: about 56 bytes a
    code (its bytes, its key, the counting pass) plus the pairs found."""
    tables, radius = job
    n = len(unique)
    code_bytes = np.ascontiguousarray(unique.astype("<u8").view(np.uint8).reshape(-1, 8).T)
    found: list[np.ndarray] = [np.zeros(0, np.int64)]
    for positions in tables:
        left, right = _pairs_within_buckets(_table_keys(code_bytes, positions))
        for start in range(0, len(left), CHUNK):
            a, b = left[start:start + CHUNK], right[start:start + CHUNK]
            near = hamming(unique[a], unique[b]) <= radius
            a, b = np.minimum(a[near], b[near]), np.maximum(a[near], b[near])
            found.append(a.astype(np.int64) * n + b)
    return np.unique(np.concatenate(found))  # a near pair usually meets in several tables


def mix(values: np.ndarray, salt: int) -> np.ndarray:
    """A well-spread 64-bit hash of integer keys (splitmix64's finaliser): which reduce task owns a key."""
    z = values.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class BandJob:
    """A band search's settings, shared by its map and reduce tasks: the Hamming ``radius``, the reduce
    ``partitions``, the banding ``tables`` per band, the entries of ``outside`` codes per partition (eval images),
    the content ``views`` a map task sends, and ``expand`` (pair the entries of a code instead of chaining them)."""

    radius: int
    partitions: int
    tables: list[list[np.ndarray]] = field(default_factory=list)
    outside: list[np.ndarray] | None = None
    views: list[int] = field(default_factory=list)
    expand: int = 0


def codes_to_bands(job: BandJob, table: pa.Table) -> list[np.ndarray]:
    """Map: each row with a pHash, once per band, to the reduce task owning (band, the band's bits), as
    (row, code, band) int64 triples."""
    import pyarrow.compute as pc

    radius, partitions = job.radius, job.partitions
    table = table.filter(pc.is_valid(table.column("phash")))
    rows = table.column("row").to_numpy().astype(np.int64)
    codes = table.column("phash").to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(rows)
    if not n:
        return [np.zeros((0, 3), np.int64)] * partitions
    owner = np.concatenate([(mix(_band_value(codes, band), b) % np.uint64(partitions)).astype(np.uint16)
                            for b, band in enumerate(bands(radius))])  # entry e: band e // n, row e % n
    order = np.argsort(owner, kind="stable")  # a radix sort: partitions are at most 65536 (see phash_pair_rows)
    bounds = np.cumsum(np.bincount(owner, minlength=partitions))[:-1]
    return [np.column_stack([rows[e % n], codes[e % n], e // n]) for e in np.split(order, bounds)]


def _band_value(codes: np.ndarray, band: np.ndarray) -> np.ndarray:
    value = codes.view(np.uint64) >> np.uint64(band[0])
    return value & np.uint64((1 << len(band)) - 1) if len(band) < 64 else value


def _near_pairs_by_band_value(unique: np.ndarray, band: np.ndarray, tables: list[np.ndarray],
                              radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The banding search over distinct codes that may hold many band values: pairs only form within one value (the
    keys hold the band's bits), so the codes are searched in batches of whole values of about SEARCH_BATCH codes,
    whose arrays stay in the CPU cache."""
    order = np.argsort(_band_value(unique, band), kind="stable")
    values = _band_value(unique[order], band)
    group_starts = np.flatnonzero(np.diff(values, prepend=values[:1] ^ np.uint64(1))) if len(values) else order
    cuts = group_starts[np.unique(group_starts // SEARCH_BATCH, return_index=True)[1]].tolist()
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start, end in zip(cuts, [*cuts[1:], len(order)]):
        batch = order[start:end]
        packed = _near_pairs_in_tables(unique[batch], (tables, radius))
        left.append(batch[packed // len(batch)])
        right.append(batch[packed % len(batch)])
    return np.concatenate(left), np.concatenate(right)


def pairs_in_bands(job: BandJob, partition: int, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reduce: the pairs of rows among these entries within ``radius`` bits that meet in a table of their band (a
    pair that meets in several bands is reported by each). Equal codes are searched once, as the smallest pool row
    holding them; the others are chained to it (in band 0, which equal codes always agree on). A job with an
    ``expand`` lists the pairs of entries instead (``_expanded_pairs``)."""
    radius, tables, outside, expand = job.radius, job.tables, job.outside, job.expand
    layout = bands(radius)
    pieces = [*pieces, outside[partition]] if outside is not None else pieces
    entries = np.concatenate(pieces) if pieces else np.zeros((0, 3), np.int64)
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    entries = entries[np.argsort(entries[:, 2].astype(np.uint8), kind="stable")]  # by band (a radix sort)
    starts = np.flatnonzero(np.diff(entries[:, 2], prepend=-1))
    for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(entries)]):
        b, rows, codes = int(entries[start, 2]), entries[start:end, 0], entries[start:end, 1]
        order = np.lexsort((rows, rows < 0, codes))  # outside rows (eval items, negative) after the pool's
        rows, codes = rows[order], codes[order]
        first = np.concatenate([[True], codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, bool)
        holder = rows[first]  # the smallest pool row of each distinct code (an outside row if it has none)
        if expand:
            _expanded_pairs(rows, first, codes, b, layout[b], tables[b], radius, expand, left, right)
            continue
        if b == 0:
            same = np.flatnonzero(~first)
            left.append(holder[np.cumsum(first)[same] - 1])
            right.append(rows[same])
        if radius:
            i, j = _near_pairs_by_band_value(codes[first], layout[b], tables[b], radius)
            left.append(holder[i])
            right.append(holder[j])
    left_rows, right_rows = np.concatenate(left), np.concatenate(right)
    return np.minimum(left_rows, right_rows), np.maximum(left_rows, right_rows)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _expanded_pairs(rows: np.ndarray, first: np.ndarray, codes: np.ndarray, b: int, band: np.ndarray,
                    tables: list[np.ndarray], radius: int, expand: int, left: list, right: list) -> None:
    """Every pair of entries instead of the holders' (for links that are not transitive, such as the content
    path's second check): all pairs among the first ``expand`` entries of one code (the others chained to the
    holder) and the cross product of those of two near codes. ``rows`` are sorted by code, then row."""
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(rows)))
    code_of = np.cumsum(first) - 1
    position = np.arange(len(rows)) - starts[code_of]
    if b == 0:  # equal codes agree on every band: band 0 lists them
        late = np.flatnonzero((position > 0) & (position < expand))
        counts = position[late]
        left.append(rows[np.repeat(starts[code_of[late]], counts) + _ragged_arange(counts)])
        right.append(np.repeat(rows[late], counts))
        beyond = np.flatnonzero(position >= expand)
        left.append(rows[starts[code_of[beyond]]])
        right.append(rows[beyond])
    if radius:
        i, j = _near_pairs_by_band_value(codes[first], band, tables, radius)
        size_i, size_j = np.minimum(sizes[i], expand), np.minimum(sizes[j], expand)
        counts = size_i * size_j
        step = _ragged_arange(counts)
        width = np.repeat(size_j, counts)
        left.append(rows[np.repeat(starts[i], counts) + step // width])
        right.append(rows[np.repeat(starts[j], counts) + step % width])


def phash_pair_rows(pool: Pool, radius: int = DEFAULT_RADIUS, tables: int | None = None, bits: int = DEFAULT_BITS,
                    seed: int = 0, outside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows (smaller row first) whose pHashes are within ``radius`` bits, found through banding; each
    pair once. The pool is shuffled by (band, band bits) into reduce tasks of at most ENTRIES_PER_TASK entries.
    ``outside`` codes (eval images) join the search as rows -1, -2, ...: each reduce task gets those of its keys."""
    entries = len(bands(radius)) * max(1, pool.rows)
    partitions = min(1 << 16, pool.partitions(entries, ENTRIES_PER_TASK))
    extra = None
    if outside is not None:
        import pyarrow as pa

        table = pa.table({"row": pa.array(-1 - np.arange(len(outside), dtype=np.int64)),
                          "phash": pa.array(np.asarray(outside, dtype=np.int64))})
        extra = codes_to_bands(BandJob(radius, partitions), table)
    job = BandJob(radius, partitions, band_tables(radius, tables or tables_for(radius, bits), bits, seed), extra)
    found = pool.shuffle(codes_to_bands, pairs_in_bands, job, ["phash"], partitions,
                         bytes_per_row=24 * len(bands(radius)))
    pairs = np.unique(np.stack(joined(found), 1), axis=0)  # a pair agreeing on several bands may meet in several
    return pairs[:, 0], pairs[:, 1]


def phash_pairs(codes: np.ndarray, radius: int = DEFAULT_RADIUS, tables: int | None = None,
                bits: int = DEFAULT_BITS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``phash_pair_rows`` over an array of codes: index pairs (i < j), each once."""
    import pyarrow as pa

    from curate.core.pool import Pool

    table = pa.table({"phash": pa.array(np.asarray(codes, dtype=np.int64))})
    pool = Pool.from_table(table, pieces=task_count(max(1, len(codes) // 50_000)))
    return phash_pair_rows(pool, radius, tables, bits, seed)


def brute_force_pairs(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    """Every pair within ``radius``, by comparing all of them: the reference the benchmark measures recall against."""
    codes = np.asarray(codes, dtype=np.int64)
    pairs: set[tuple[int, int]] = set()
    for i in range(len(codes) - 1):
        near = np.flatnonzero(hamming(codes[i + 1:], np.full(len(codes) - i - 1, codes[i])) <= radius) + i + 1
        pairs.update((i, int(j)) for j in near)
    return pairs


def split_by_owner(owner: np.ndarray, arrays: Sequence[np.ndarray], partitions: int) -> list[list[np.ndarray]]:
    """Rows of ``arrays`` (aligned) cut by the partition that owns them: for each partition, its slice of each."""
    order = np.argsort(owner.astype(np.uint16) if partitions <= 1 << 16 else owner, kind="stable")  # radix sort
    bounds = np.cumsum(np.bincount(owner, minlength=partitions))[:-1]
    cut = [np.split(array[order], bounds) for array in arrays]
    return [[pieces[j] for pieces in cut] for j in range(partitions)]


def joined(found: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of all reduce tasks as two arrays."""
    return (np.concatenate([np.zeros(0, np.int64), *(f[0] for f in found)]),
            np.concatenate([np.zeros(0, np.int64), *(f[1] for f in found)]))
