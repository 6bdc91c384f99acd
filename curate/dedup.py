"""Duplicate finding over stored fingerprints: exact groups, perceptual-hash pairs, groups, and who survives.

Pure functions over numpy arrays, so the dedup stages stay small and the benchmark measures exactly what they run.

pHash candidates come from banding (locality-sensitive hashing on bit samples): each of ``tables`` tables keys every
code by a fixed random subset of ``bits`` of its 64 bits, and codes that share a key in any table are candidates.
Two codes ``d`` bits apart share a table's key with probability C(64-d, bits)/C(64, bits), so near codes almost
surely meet and far ones almost never do; candidates are then checked exactly (popcount of the XOR). Work grows with
the number of codes, not with its square: at the default settings a table's bucket holds about one code per million.
Multi-index hashing (r+1 exact bands) would find every pair, but at the radius that 5% crops need (about 10 bits)
its 6-bit bands put thousands of codes in a bucket and the pairs grow quadratically. With 24-bit keys a bucket
holds about one code in 16 million, so up to tens of millions of codes the cost is the tables' sorts: linear-ish.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from curate.fan_out import fan_out, ships, task_count

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_RADIUS = 8
DEFAULT_BITS = 24  # at most 32: keys are uint32
TABLE_RECALL = 0.97  # the share of pairs exactly `radius` bits apart that meet in some table (nearer ones: more)
CHUNK = 1 << 20  # candidate pairs checked per numpy pass: bounds the memory of a pass to a few dozen MB


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64))).astype(np.int64)


def tables_for(radius: int, bits: int = DEFAULT_BITS, recall: float = TABLE_RECALL) -> int:
    """Tables needed so that two codes ``radius`` bits apart share a key in at least one with probability ``recall``."""
    from math import ceil, comb, log

    meet = comb(64 - radius, bits) / comb(64, bits)  # all `bits` sampled positions avoid the differing ones
    return 1 if meet >= 1 else max(1, ceil(log(1 - recall) / log(1 - meet)))


def _bit_masks(tables: int, bits: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(64, size=bits, replace=False)).astype(np.uint64) for _ in range(tables)]


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

    Most codes share their key with no other: a counting pass (over the key folded to about 4 bins per code) finds
    the few that might, and only those are sorted. Sorting every key of every table cost more than all the rest."""
    bins = 1 << max(4, int(np.ceil(np.log2(4 * max(1, len(keys))))))
    folded = (keys & np.uint32(bins - 1)).astype(np.intp) if bins < 2**32 else keys.astype(np.intp)
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
            found.append(np.unique(a.astype(np.int64) * n + b))
    return np.unique(np.concatenate(found))


def phash_pairs(codes: np.ndarray, radius: int = DEFAULT_RADIUS, tables: int | None = None,
                bits: int = DEFAULT_BITS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of codes within ``radius`` bits, found through banding; each pair once.

    Identical codes are collapsed first (a pool with 10,000 blank images has one code for them, not 50 million
    pairs): each distinct code's rows are chained to its first row, and the search runs over distinct codes.
    The tables are independent: on Ray each group of tables is one task (curate.fan_out) over the shared codes."""
    codes = np.asarray(codes, dtype=np.int64).view(np.uint64)
    unique, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    same_left = first[inverse]
    chained = np.flatnonzero(same_left != np.arange(len(codes)))
    found_left, found_right = [same_left[chained]], [chained]
    masks = _bit_masks(tables or tables_for(radius, bits), bits, seed)
    parts = [([masks[i] for i in group], radius) for group in np.array_split(np.arange(len(masks)),
                                                                           task_count(len(masks)))]
    # a near pair usually meets in several tables, and so in several parts: keep it once
    packed = np.unique(np.concatenate(fan_out(_near_pairs_in_tables, unique, parts)))
    found_left.append(first[packed // max(1, len(unique))])
    found_right.append(first[packed % max(1, len(unique))])
    left, right = np.concatenate(found_left).astype(np.int64), np.concatenate(found_right).astype(np.int64)
    return np.minimum(left, right), np.maximum(left, right)


def brute_force_pairs(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    """Every pair within ``radius``, by comparing all of them: the reference the benchmark measures recall against."""
    codes = np.asarray(codes, dtype=np.int64)
    pairs: set[tuple[int, int]] = set()
    for i in range(len(codes) - 1):
        near = np.flatnonzero(hamming(codes[i + 1:], np.full(len(codes) - i - 1, codes[i])) <= radius) + i + 1
        pairs.update((i, int(j)) for j in near)
    return pairs


def groups_of(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph: a group label per row (rows in no pair are their own group)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def keep_order(uids: Sequence[str], scores: np.ndarray | None, pixels: np.ndarray | None) -> np.ndarray:
    """Row positions from the best survivor to the worst: the highest clip_score, then the larger image, then the
    smallest uid. Missing values rank last."""
    n = len(uids)
    score = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf) if scores is not None else np.zeros(n)
    size = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=-1) if pixels is not None else np.zeros(n)
    uid_rank = np.argsort(np.argsort(np.asarray(uids, dtype=object)))
    return np.lexsort((uid_rank, -size, -score))


def duplicates_of(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each row, the position of its group's survivor (itself for survivors and for rows alone)."""
    if not len(labels):
        return np.zeros(0, np.int64)
    group, first = np.unique(labels[order], return_index=True)  # each group's first row in keep order
    survivor = np.empty(labels.max() + 1, dtype=np.int64)
    survivor[group] = order[first]
    return survivor[labels]


def color_differences(signatures: Sequence[bytes], left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The largest difference (0-255) of any channel of any cell of the pairs' 4 × 4 RGB grids: a shape that changed
    colour changes the cells it covers a lot, a re-encode or a brighter copy changes every cell a little."""
    grid = np.frombuffer(b"".join(signatures), dtype=np.uint8).reshape(len(signatures), -1).astype(np.int16)
    return np.abs(grid[left] - grid[right]).max(axis=1) if len(left) else np.zeros(0)


def removals(uids: Sequence[str], labels: np.ndarray, scores: np.ndarray | None, pixels: np.ndarray | None,
             reason: str) -> pa.Table:
    """The rows a grouping removes: every member of a group but its survivor, each pointing at the survivor."""
    import pyarrow as pa

    survivor = duplicates_of(labels, keep_order(uids, scores, pixels))
    removed = np.flatnonzero(survivor != np.arange(len(labels)))
    uid_array = np.asarray(uids, dtype=object)
    return pa.table({"uid": pa.array(uid_array[removed].tolist(), pa.string()),
                     "status": pa.array(["filtered"] * len(removed), pa.string()),
                     "reason": pa.array([reason] * len(removed), pa.string()),
                     "duplicate_of": pa.array(uid_array[survivor[removed]].tolist(), pa.string())})


BLOCK_ELEMENTS = 1 << 25  # similarities computed per block inside a cluster: 128 MB of float32 at most


def _nearest_centroids(centroids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The cluster of each of these embeddings: the most similar centroid."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return index.search(np.ascontiguousarray(rows), 1)[1].ravel()


def _similar_pairs_in_clusters(x: np.ndarray | None,
                               job: tuple[np.ndarray, list[int], float]) -> tuple[np.ndarray, np.ndarray]:
    """Every pair inside each cluster whose cosine is at least ``threshold``, as positions in the part's rows (its
    clusters one after another, ``sizes`` rows each). The rows are ``job[0]`` itself (on Ray: a task gets only its
    part's vectors), or positions into ``x`` (in one process: no copy of the embeddings). Memory: one cluster's rows
    and a similarity block of at most BLOCK_ELEMENTS floats."""
    rows, sizes, threshold = job
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    offset = 0
    for size in sizes:
        cluster = rows[offset:offset + size] if x is None else x[rows[offset:offset + size]]
        step = max(1, BLOCK_ELEMENTS // max(1, size))
        for start in range(0, size, step):
            i, j = np.nonzero(cluster[start:start + step] @ cluster.T >= threshold)
            i = i + start
            upper = j > i  # each pair once, never a row with itself
            left.append(offset + i[upper])
            right.append(offset + j[upper])
        offset += size
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


def semantic_pairs(embeddings: np.ndarray, threshold: float, clusters: int | None = None,
                   fit_sample: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's candidates: spherical k-means over L2-normalised embeddings (fitted on a sample of at most
    ``fit_sample`` rows), then every pair inside a cluster whose cosine is at least ``threshold``.

    Comparing only inside clusters is what makes it scale (n²/k pairs instead of n²); a duplicate pair split across
    two clusters is missed, which is rare at a high threshold (the two sit next to each other). On Ray, assigning
    rows to clusters runs as tasks over row ranges, and the in-cluster search as tasks over groups of clusters of
    about equal work (curate.fan_out)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    k = max(1, min(clusters or n // 1000, n // 2 or 1))
    if k > 1:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, size=min(n, fit_sample), replace=False)] if n > fit_sample else x
        kmeans = faiss.Kmeans(dim, k, niter=20, seed=seed, spherical=True, verbose=False)
        kmeans.train(sample)
        bounds = np.linspace(0, n, task_count(max(1, n // 1000)) + 1).astype(int)
        blocks = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # each task gets only its rows
        assign = np.concatenate(fan_out(_nearest_centroids, kmeans.centroids, blocks))
    else:
        assign = np.zeros(n, dtype=np.int64)
    order = np.argsort(assign, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(assign[order])) + 1)
    # clusters dealt to parts largest first, each to the part with the least work so far (work ~ size²)
    parts: list[list[np.ndarray]] = [[] for _ in range(min(len(members), task_count(len(members))))]
    work = np.zeros(len(parts))
    for cluster in sorted(members, key=len, reverse=True):
        lightest = int(np.argmin(work))
        parts[lightest].append(np.sort(cluster))
        work[lightest] += float(len(cluster)) ** 2
    parts = [part for part in parts if part]
    rows = [np.concatenate(part) for part in parts]  # each part's rows, cluster after cluster
    shipped = ships(len(parts))  # tasks get their own vectors; in one process, positions into x
    jobs = [(x[part_rows] if shipped else part_rows, [len(c) for c in part], threshold)
            for part_rows, part in zip(rows, parts)]
    found = fan_out(_similar_pairs_in_clusters, None if shipped else x, jobs)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([part_rows[f[0]] for part_rows, f in zip(rows, found)]).astype(np.int64),
            np.concatenate([part_rows[f[1]] for part_rows, f in zip(rows, found)]).astype(np.int64))
