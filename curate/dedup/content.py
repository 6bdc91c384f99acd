"""The content path of the pHash tier: candidate pairs from the views of each row's content box (and its
whole-image pHash) searched through the bands, then verified on registered thumbnails and colour grids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from curate.dedup import bands as band_search
from curate.dedup.bands import BandJob, band_tables, bands, codes_to_bands, joined, pairs_in_bands, tables_for

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.core.pool import Pool


# Each row (curate.dedup.fingerprints) takes part in the band search with several
# codes, as entries ``row * VIEW_SLOTS + view``: the views of its content box and its whole-image pHash.
VIEW_SLOTS = 8
# entries of one code paired with each other (the second check is not transitive: a code shared by two copies and
# an unrelated drawing must still pair the copies); past it, the rest are chained to the code's first entry
EXPAND = 64
MEAN_VIEW = 4  # the content box's mean hash: compared with other mean hashes only
FULL_VIEW = 5  # the whole-image ``phash`` column, after the five content views


def entry_views(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return entries // VIEW_SLOTS, entries % VIEW_SLOTS


def _content_codes_to_bands(job: BandJob, table: pa.Table) -> list[np.ndarray]:
    """Map: every view code of each row (the content ``views``, and the whole-image pHash) as an entry."""
    import pyarrow as pa
    import pyarrow.compute as pc

    radius, partitions, views = job.radius, job.partitions, job.views
    rows = table.column("row").to_numpy().astype(np.int64)
    lists = table.column("content_phash").combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int64()))
    entries, codes = [], []
    if len(lists):
        flat = pc.list_flatten(lists)
        parent = pc.list_parent_indices(lists).to_numpy()
        offsets = lists.offsets.to_numpy()[:-1][parent] - lists.offsets.to_numpy()[0]
        view = np.arange(len(flat)) - offsets
        present = (~np.asarray(flat.is_null())) & np.isin(view, views)
        entries.append(rows[parent[present]] * VIEW_SLOTS + view[present])
        # nulls filled before the conversion: with nulls numpy gets float64, which rounds a code to 53 bits
        codes.append(flat.fill_null(0).to_numpy()[present].astype(np.int64))
    whole = table.filter(pc.is_valid(table.column("phash")))
    entries.append(whole.column("row").to_numpy().astype(np.int64) * VIEW_SLOTS + FULL_VIEW)
    codes.append(whole.column("phash").to_numpy(zero_copy_only=False).astype(np.int64))
    as_table = pa.table({"row": pa.array(np.concatenate(entries)), "phash": pa.array(np.concatenate(codes))})
    return codes_to_bands(BandJob(radius, partitions), as_table)


def content_candidates(pool: Pool, radius: int, bits: int, seed: int, mirror: bool
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of rows whose codes of compatible views are within ``radius`` bits: (row a, row b, b's centre share,
    whether a is mirrored), with row a's whole box on one side. A centre view is compared with whole boxes only (two
    centre views agree for drawings that differ outside them, an outlined T and an outlined ⊥), a mirror view with
    the other's box only, a mean hash or the whole-image pHash with the other's only. A row pair matched through several view
    pairs is verified for each."""
    views = [0, 1, 2, 3, MEAN_VIEW] if mirror else [0, 1, 2, MEAN_VIEW]
    per_row = len(views) + 1
    entries = per_row * len(bands(radius)) * max(1, pool.rows)
    partitions = min(1 << 16, pool.partitions(entries, band_search.ENTRIES_PER_TASK))
    job = BandJob(radius, partitions, band_tables(radius, tables_for(radius, bits), bits, seed), views=views,
                  expand=EXPAND)
    found = pool.shuffle(_content_codes_to_bands, pairs_in_bands, job, ["content_phash", "phash"], partitions,
                         bytes_per_row=24 * len(bands(radius)) * per_row)
    left, right = joined(found)
    row_a, view_a = entry_views(left)
    row_b, view_b = entry_views(right)
    # orient each pair so that side a is a whole box (or a mirrored box, or the whole image)
    swap = (view_a == 1) | (view_a == 2) | ((view_b == 3) & (view_a == 0))
    row_a, row_b = np.where(swap, row_b, row_a), np.where(swap, row_a, row_b)
    view_a, view_b = np.where(swap, view_b, view_a), np.where(swap, view_a, view_b)
    allowed = ((view_a == 0) & np.isin(view_b, [0, 1, 2])) | ((view_a == 3) & (view_b == 0)) | \
              ((view_a == MEAN_VIEW) & (view_b == MEAN_VIEW)) | ((view_a == FULL_VIEW) & (view_b == FULL_VIEW))
    keep = allowed & (row_a != row_b)
    centre = np.select([view_b == 1, view_b == 2], [0.9, 0.8], 1.0)
    table = np.unique(np.stack([row_a[keep], row_b[keep], (100 * centre[keep]).astype(np.int64),
                                (view_a[keep] == 3).astype(np.int64)], axis=1), axis=0)
    return table[:, 0], table[:, 1], table[:, 2] / 100.0, table[:, 3].astype(bool)


def verified_links(max_difference: float, max_color_difference: float, centre: np.ndarray, mirrored: np.ndarray):
    """The ``links`` of decide_groups for content candidates: a candidate is an edge when the thumbnails, registered,
    differ by at most ``max_difference`` in every block and the colour grids by at most ``max_color_difference``.
    ``centre`` and ``mirrored`` are aligned with the candidates' pairs."""
    from curate.dedup.fingerprints import COLOR_GRID, coarse, content_thumbnails, thumbnails, verify

    def links(info: pa.Table, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grey, old = content_thumbnails(info.column("content_thumbnail").to_pylist())
        colors = thumbnails(info.column("content_colors").to_pylist(), COLOR_GRID, 3)
        accepted = np.zeros(len(left), dtype=bool)
        for start in range(0, len(left), VERIFY_CHUNK):
            part = slice(start, start + VERIFY_CHUNK)
            a, b = left[part], right[part]
            grey_a, grey_b = grey[a], grey[b]
            mixed = old[a] | old[b]  # a side stored at 16 px: both compared at that detail
            if mixed.any():
                grey_a[mixed], grey_b[mixed] = coarse(grey_a[mixed]), coarse(grey_b[mixed])
            difference, colour = verify(grey_a, grey_b, colors[a], colors[b], centre[part], mirrored[part])
            accepted[part] = (difference <= max_difference) & (colour <= max_color_difference)
        return left[accepted], right[accepted]
    return links


VERIFY_CHUNK = 5_000  # candidate pairs registered at once: each of the 49 window tries samples 5k × 32 × 32
# floats (40 MB) and a few temporaries of that size
