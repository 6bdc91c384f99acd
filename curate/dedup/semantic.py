"""SemDeDup over a pool: spherical k-means on a sample of the stored image embeddings, then, inside each cluster,
pairs at cosine ≥ threshold. Embeddings of different scoring models live in different spaces and are never compared.

Passes over the pool's parts, none of which gathers it: a count of the embedded rows per model; a sample of about
``fit_sample`` rows per model (chosen by a seeded hash of the uid, so it does not depend on the order of the rows or
on how the pool is cut), on which the driver fits k-means; per model, a shuffle that sends each row to the reduce
task owning its nearest centroid, where the pairs are found and reduced to a forest (a cluster of m copies has
m²/2 pairs, but m - 1 edges hold its group); and the keep policy's lookup of the rows in some pair. Comparing only inside clusters is what makes it scale
(n²/k pairs instead of n²); a duplicate pair split across two clusters is missed, which is rare at a high threshold.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.dedup.bands import mix, split_by_owner
from curate.core.embeddings import embedding_matrix
from curate.core.fan_out import task_count

if TYPE_CHECKING:
    from curate.core.pool import Pool

COLUMNS = ["clip_model", "image_embedding"]
BLOCK_ELEMENTS = 1 << 25  # similarities computed per block inside a cluster: 128 MB of float32 at most
BYTES_PER_TASK = 512 << 20  # float32 vectors a reduce task works on (plus its largest cluster's similarity blocks)


def unit_rows(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float> embedding column as an (n, d) float32 matrix with L2-normalised rows."""
    x = embedding_matrix(column).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _embedded(table: pa.Table) -> pa.Table:
    return table.filter(pc.and_(pc.is_valid(table.column("image_embedding")), pc.is_valid(table.column("clip_model"))))


def _count_models(_job: None, table: pa.Table) -> Counter[str]:
    """Rows per model, from the small ``clip_model`` column alone: the embeddings are read twice, by the sample
    and by the assignment, not a third time for a count (a scored row without its embedding only lowers the
    sampling rate a little)."""
    return Counter(m for m in table.column("clip_model").to_pylist() if m is not None)


def _priority(uids: list[str], seed: int) -> np.ndarray:
    key = seed.to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8, key=key).digest(), "little")
                     for u in uids], dtype=np.uint64)


def _sample(job: tuple[dict[str, float], int], table: pa.Table) -> pa.Table:
    """The rows whose uid hash falls under their model's sampling rate, with their priority (the hash)."""
    rates, seed = job
    table = _embedded(table)
    priority = _priority(table.column("uid").to_pylist(), seed)
    limit = np.array([rates.get(m, 0.0) for m in table.column("clip_model").to_pylist()]) * 2.0**64
    picked = np.flatnonzero(priority.astype(np.float64) < limit)
    return table.take(pa.array(picked)).append_column("priority", pa.array(priority[picked]))


@dataclass(frozen=True)
class ClusterJob:
    """One model's shuffle: rows embedded by ``model`` go to the reduce task owning their nearest of the
    ``centroids`` (one of ``partitions``), where pairs with cosine ≥ ``threshold`` are found."""

    model: str
    centroids: np.ndarray
    partitions: int
    threshold: float


def _assign(job: ClusterJob, table: pa.Table) -> list[list[np.ndarray]]:
    """Map: each row embedded by this model to the reduce task owning its nearest centroid, as (row, cluster,
    stored vector): the vectors travel at the precision they are stored in (float16) and are normalised there."""
    import faiss

    model, centroids, partitions = job.model, job.centroids, job.partitions
    table = _embedded(table)
    table = table.filter(pc.equal(table.column("clip_model"), model))
    stored = embedding_matrix(table.column("image_embedding")) if table.num_rows else np.zeros((0, 1), np.float16)
    if len(centroids) > 1 and table.num_rows:
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        nearest = index.search(unit_rows(table.column("image_embedding")), 1)[1].ravel().astype(np.int64)
    else:
        nearest = np.zeros(table.num_rows, np.int64)
    owner = (mix(nearest, 11) % np.uint64(partitions)).astype(np.intp)
    return split_by_owner(owner, [table.column("row").to_numpy().astype(np.int64), nearest, stored], partitions)


def _forest(size: int, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same groups with fewer edges: each member linked to its group's first member. A cluster of m copies has
    m²/2 pairs but m - 1 forest edges; the semantic tier keeps every pair it finds, so groups are all it needs."""
    from curate.dedup.groups import groups_of

    labels = groups_of(size, left, right)
    first = np.full(labels.max() + 1 if size else 0, size, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(size))
    members = np.flatnonzero(first[labels] != np.arange(size))
    return first[labels[members]], members


def _pairs_in_clusters(job: ClusterJob, partition: int, pieces: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Reduce: the groups of rows inside each of this task's clusters linked by cosine ≥ the threshold, as pairs of
    rows (a forest: at most one edge per row). Memory: the task's vectors, one block of at most BLOCK_ELEMENTS
    similarities and the pairs found in it (as many, in a cluster of copies), compacted to a forest per block."""
    threshold = job.threshold
    pieces = [p for p in pieces if len(p[0])]
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if not pieces:
        return left[0], right[0]
    rows = np.concatenate([p[0] for p in pieces])
    clusters = np.concatenate([p[1] for p in pieces])
    order = np.lexsort((rows, clusters))
    rows, clusters = rows[order], clusters[order]
    vectors = np.concatenate([p[2] for p in pieces])[order].astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    starts = np.flatnonzero(np.concatenate([[True], clusters[1:] != clusters[:-1]]))
    for start, end in zip(starts, [*starts[1:], len(rows)]):
        cluster = vectors[start:end]
        size = end - start
        step = max(1, BLOCK_ELEMENTS // max(1, size))
        found_i, found_j = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for block in range(0, size, step):
            i, j = np.nonzero(cluster[block:block + step] @ cluster.T >= threshold)
            i = i + block
            upper = j > i  # each pair once, never a row with itself
            found_i, found_j = np.concatenate([found_i, i[upper]]), np.concatenate([found_j, j[upper]])
            if len(found_i) > 2 * size:
                found_i, found_j = _forest(size, found_i, found_j)
        if len(found_i):
            found_i, found_j = _forest(size, found_i, found_j)
            left.append(rows[start + found_i])
            right.append(rows[start + found_j])
    return np.concatenate(left), np.concatenate(right)


def embedding_samples(pool: Pool, fit_sample: int, seed: int) -> tuple[Counter[str], dict[str, pa.Table]]:
    """Embedded rows per scoring model, and per model a sample of about ``fit_sample`` of them (uid, row,
    clip_model, image_embedding), chosen by a seeded hash of the uid: two passes over the parts."""
    counts: Counter[str] = sum(pool.map(_count_models, None, ["clip_model"]), Counter())
    if not counts:
        return counts, {}
    rates = {model: min(1.0, 1.2 * fit_sample / count) for model, count in counts.items()}
    sampled = [t for t in pool.map(_sample, (rates, seed), COLUMNS) if t.num_rows]
    sample = pa.concat_tables(sampled, promote_options="permissive")
    samples = {}
    for model in sorted(counts):
        rows = sample.filter(pc.equal(sample.column("clip_model"), model))
        rows = rows.take(pc.sort_indices(rows, [("priority", "ascending"), ("uid", "ascending")]))[:fit_sample]
        if rows.num_rows:  # about 1.2 × fit_sample rows are expected: none only if the model has none left
            samples[model] = rows
    return counts, samples


def cluster_count(clusters: int | None, rows: int, sampled: int) -> int:
    """``clusters`` if given, else one per 1000 rows but at most one per 40 sample rows (what faiss wants to fit
    a centroid); never more than half the sample."""
    k = clusters or min(rows // 1000, sampled // 40)
    return max(1, min(k, sampled // 2 or 1))


def spherical_centroids(rows: pa.Table, k: int, seed: int) -> np.ndarray:
    """``k`` spherical k-means (faiss) centroids of the sampled rows' unit embeddings; one zero centroid for k 1."""
    import faiss

    x = unit_rows(rows.column("image_embedding"))
    if k < 2:
        return np.zeros((1, x.shape[1]), np.float32)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    return kmeans.centroids


def semantic_pair_rows(pool: Pool, threshold: float, clusters: int | None = None, fit_sample: int = 100_000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows (smaller row first) of one model whose image embeddings have cosine ≥ ``threshold``, as a
    forest: rows linked through others may come as (first member, row) rather than as every pair."""
    counts, samples = embedding_samples(pool, fit_sample, seed)
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for model, rows in samples.items():  # each model its own space: its own k-means and its own shuffle
        centroids = spherical_centroids(rows, cluster_count(clusters, counts[model], rows.num_rows), seed)
        dim = centroids.shape[1]
        itemsize = embedding_matrix(rows.column("image_embedding")[:1]).dtype.itemsize  # as stored: float16
        emitted = (itemsize * dim + 16) * counts[model] / max(1, pool.rows)  # a vector, its row and cluster
        partitions = pool.partitions(counts[model] * 4 * dim, BYTES_PER_TASK)  # float32 while they work
        found = pool.shuffle(_assign, _pairs_in_clusters, ClusterJob(model, centroids, partitions, threshold), COLUMNS,
                             partitions, bytes_per_row=emitted)
        left += [f[0] for f in found]
        right += [f[1] for f in found]
    left_rows, right_rows = np.concatenate(left), np.concatenate(right)
    return np.minimum(left_rows, right_rows), np.maximum(left_rows, right_rows)


def semantic_pairs(embeddings: np.ndarray, threshold: float, clusters: int | None = None,
                   fit_sample: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``semantic_pair_rows`` over an (n, d) array of one model's embeddings: index pairs (i < j)."""
    from curate.core.pool import Pool

    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    table = pa.table({"uid": [f"{i:012d}" for i in range(n)], "clip_model": ["model"] * n,
                      "image_embedding": pa.FixedSizeListArray.from_arrays(x.ravel(), x.shape[1]).cast(
                          pa.list_(pa.float32()))})
    return semantic_pair_rows(Pool.from_table(table, pieces=task_count(max(1, n // 2000))), threshold, clusters,
                              fit_sample, seed)
