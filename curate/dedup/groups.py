"""From pairs of duplicate rows to decisions: groups (connected components), the keep policy (highest
clip_score, then the larger image, then the smallest uid) and the removed rows, each pointing at its survivor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.core.pool import Pool


def groups_of(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph: a group label per row (rows in no pair are their own group)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def uid_ranks(uids: Sequence[str]) -> np.ndarray:
    """Each row's position in uid order: the tie-break that makes a decision independent of the input's order."""
    return np.argsort(np.argsort(np.asarray(uids, dtype=object)))


def keep_order(uids: Sequence[str], scores: np.ndarray | None, pixels: np.ndarray | None) -> np.ndarray:
    """Row positions from the best survivor to the worst: the highest clip_score, then the larger image, then the
    smallest uid. Missing values rank last."""
    n = len(uids)
    score = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf) if scores is not None else np.zeros(n)
    size = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=-1) if pixels is not None else np.zeros(n)
    return np.lexsort((uid_ranks(uids), -size, -score))


def duplicates_of(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each row, the position of its group's survivor (itself for survivors and for rows alone)."""
    if not len(labels):
        return np.zeros(0, np.int64)
    group, first = np.unique(labels[order], return_index=True)  # each group's first row in keep order
    survivor = np.empty(labels.max() + 1, dtype=np.int64)
    survivor[group] = order[first]
    return survivor[labels]


def color_grid(signatures: Sequence[bytes]) -> np.ndarray:
    """The 4 × 4 RGB grids as one signed row each, ready to subtract."""
    return np.frombuffer(b"".join(signatures), dtype=np.uint8).reshape(len(signatures), -1).astype(np.int16)


def color_differences(signatures: Sequence[bytes], left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The largest difference (0-255) of any channel of any cell of the pairs' 4 × 4 RGB grids: a shape that changed
    colour changes the cells it covers a lot, a re-encode or a brighter copy changes every cell a little."""
    grid = color_grid(signatures)
    return np.abs(grid[left] - grid[right]).max(axis=1) if len(left) else np.zeros(0)


def removals(uids: Sequence[str], labels: np.ndarray, scores: np.ndarray | None, pixels: np.ndarray | None,
             reason: str, rows: np.ndarray | None = None) -> pa.Table:
    """The rows a grouping removes: every member of a group but its survivor, each pointing at the survivor (with
    their ``row`` ids when given)."""
    import pyarrow as pa

    survivor = duplicates_of(labels, keep_order(uids, scores, pixels))
    removed = np.flatnonzero(survivor != np.arange(len(labels)))
    uid_array = np.asarray(uids, dtype=object)
    columns = {"uid": pa.array(uid_array[removed].tolist(), pa.string()),
               "status": pa.array(["filtered"] * len(removed), pa.string()),
               "reason": pa.array([reason] * len(removed), pa.string()),
               "duplicate_of": pa.array(uid_array[survivor[removed]].tolist(), pa.string())}
    if rows is not None:
        columns["row"] = pa.array(np.asarray(rows, dtype=np.int64)[removed])
    return pa.table(columns)


KEEP_POLICY_COLUMNS = ("clip_score", "original_width", "original_height")


def keep_policy_inputs(metadata: pa.Table) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(clip_score, original pixel count) for the keep policy, each None when the pipeline does not store it."""
    names = metadata.column_names
    scores = metadata.column("clip_score").to_numpy(zero_copy_only=False) if "clip_score" in names else None
    pixels = None
    if "original_width" in names and "original_height" in names:
        width = metadata.column("original_width").to_numpy(zero_copy_only=False).astype(np.float64)
        pixels = width * metadata.column("original_height").to_numpy(zero_copy_only=False).astype(np.float64)
    return scores, pixels


def decide_groups(pool: Pool, left: np.ndarray, right: np.ndarray, reason: str, columns: Sequence[str] = (),
                  links: Callable[[pa.Table, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> pa.Table:
    """The removals of a tier from its pairs of rows: only rows in some pair are looked up (their uid, the keep
    policy's columns and ``columns``), ``links`` may turn the pairs into the edges that count (the pHash tier's
    colour check), the edges join rows into groups and each group keeps one row by the keep policy."""
    members = np.unique(np.concatenate([left, right]))
    info = pool.lookup(members, [*(c for c in KEEP_POLICY_COLUMNS if pool.has(c)), *columns])
    rows = info.column("row").to_numpy()
    if len(rows) != len(members):
        raise RuntimeError(f"{reason}: {len(members) - len(rows)} paired rows are not live rows of the pool")
    i, j = np.searchsorted(rows, left), np.searchsorted(rows, right)
    if links is not None and len(i):
        i, j = links(info, i, j)
    scores, pixels = keep_policy_inputs(info)  # only the columns the pool stores were looked up
    return removals(info.column("uid").to_pylist(), groups_of(len(rows), i, j), scores, pixels, reason, rows)
