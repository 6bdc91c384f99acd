"""The pool a global stage reads: live rows only, groups of parts bounded in rows, rows looked up by id, and dedup
pairs that do not depend on how the pool is cut into parts and partitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core import pool as pool_module
from curate.dedup import bands, exact, semantic
from curate.core.fan_out import in_process
from curate.core.pool import Pool, ids_in


def _write_parts(folder, parts: int, rows: int) -> list:
    paths = []
    for part in range(parts):
        ids = np.arange(part * rows, (part + 1) * rows)
        status = ["failed" if i % 10 == 0 else "ok" for i in ids]
        paths.append(folder / f"{part:03d}.parquet")
        pq.write_table(pa.table({"uid": [f"u{i}" for i in ids], "row": pa.array(ids, pa.int64()), "status": status,
                                 "phash": pa.array(ids * 3, pa.int64())}), paths[-1])
    return paths


def test_live_rows_groups_and_lookup(tmp_path, monkeypatch) -> None:
    pool = Pool.from_parts(_write_parts(tmp_path, parts=5, rows=100))
    assert pool.rows == 500 and pool.has("phash") and not pool.has("clip_score")
    monkeypatch.setattr(pool_module, "ROWS_PER_TASK", 250)
    with in_process():  # on Ray, groups are also cut to two per CPU
        assert [len(g) for g in pool.groups()] == [2, 2, 1]  # whole parts, at most 250 rows a group
    live = pool.without(np.array([1, 2, 251]))
    table = live.gather(["phash", "clip_score"])
    rows = set(table.column("row").to_pylist())
    assert len(rows) == 500 - 50 - 3 and not rows & {0, 10, 1, 2, 251}  # failed and removed rows are not live
    assert table.column("clip_score").null_count == table.num_rows  # a column the parts lack comes back empty
    found = live.lookup(np.array([499, 3, 2, 10, 3]), ["phash"])
    assert found.column("row").to_pylist() == [3, 499]  # sorted, once, live only
    assert found.column("phash").to_pylist() == [9, 1497]


def test_ids_in_searches_only_the_slice_in_range() -> None:
    ids = np.array([2, 5, 9, 40, 41])
    assert ids_in(np.array([9, 3, 40, 41, 100]), ids).tolist() == [True, False, True, True, False]
    assert ids_in(np.array([0, 1]), ids).tolist() == [False, False]
    assert ids_in(np.array([], dtype=np.int64), ids).tolist() == []


def _table(n: int) -> pa.Table:
    rng = np.random.default_rng(4)
    codes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    codes[n - 300:] = codes[:300] ^ (1 << rng.integers(0, 63, size=300))  # one bit away
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors[n - 600:n - 500] = vectors[300:400] + 0.002
    digests = [f"d{i % (n - 50)}" for i in range(n)]  # the last 50 repeat the first 50
    return pa.table({"uid": [f"u{i:05d}" for i in range(n)], "phash": pa.array(codes), "sha256": digests,
                     "clip_model": ["m"] * n,
                     "image_embedding": pa.array(vectors.tolist(), pa.list_(pa.float32()))})


def _pairs(found: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(found[0].tolist(), found[1].tolist()))


def test_dedup_pairs_do_not_depend_on_how_the_pool_is_cut(monkeypatch) -> None:
    table = _table(4000)
    whole = Pool.from_table(table)
    expected = (_pairs(bands.phash_pair_rows(whole, radius=6)), _pairs(exact.exact_pair_rows(whole, ["sha256"])),
                _pairs(semantic.semantic_pair_rows(whole, 0.999, clusters=4)))
    assert len(expected[0]) >= 290 and len(expected[1]) == 50 and len(expected[2]) >= 95
    monkeypatch.setattr(bands, "ENTRIES_PER_TASK", 1500)  # 19 pHash partitions (7 bands)
    monkeypatch.setattr(semantic, "BYTES_PER_TASK", 20_000)  # 7 cluster partitions
    cut = Pool.from_table(table, pieces=7)
    assert (_pairs(bands.phash_pair_rows(cut, radius=6)), _pairs(exact.exact_pair_rows(cut, ["sha256"])),
            _pairs(semantic.semantic_pair_rows(cut, 0.999, clusters=4))) == expected


def test_a_phash_reduce_task_gets_about_its_share_of_the_entries() -> None:
    codes = np.random.default_rng(1).integers(-2**63, 2**63 - 1, size=20_000, dtype=np.int64)
    table = pa.table({"row": pa.array(np.arange(20_000)), "phash": pa.array(codes)})
    pieces = bands.codes_to_bands(bands.BandJob(8, 36), table)
    sizes = [len(piece) for piece in pieces]
    assert len(sizes) == 36 and sum(sizes) == 9 * 20_000  # each row once per band
    assert max(sizes) <= 1.5 * sum(sizes) / 36


def test_semantic_tier_handles_models_of_different_widths() -> None:
    rng = np.random.default_rng(6)
    narrow, wide = rng.normal(size=(300, 8)), rng.normal(size=(300, 16))
    narrow[250:] = narrow[:50] + 0.001
    wide[200:260] = wide[:60] + 0.001
    table = pa.table({"uid": [f"u{i:04d}" for i in range(600)], "clip_model": ["small"] * 300 + ["large"] * 300,
                      "image_embedding": pa.array([v.tolist() for v in narrow] + [v.tolist() for v in wide],
                                                  pa.list_(pa.float32()))})
    pairs = _pairs(semantic.semantic_pair_rows(Pool.from_table(table, pieces=3), 0.999, clusters=2))
    assert pairs == {(i, 250 + i) for i in range(50)} | {(300 + i, 500 + i) for i in range(60)}


def test_a_cluster_of_many_copies_comes_back_as_a_forest() -> None:
    rng = np.random.default_rng(8)
    base = rng.normal(size=16)
    vectors = np.stack([base + 1e-4 * rng.normal(size=16) for _ in range(400)])
    left, right = semantic.semantic_pairs(vectors, threshold=0.99, clusters=1)
    assert len(left) == 399 and set(left.tolist()) == {0} and set(right.tolist()) == set(range(1, 400))


def test_a_group_is_big_enough_for_its_pieces_even_past_its_row_cap(tmp_path) -> None:
    pool = Pool.from_parts(_write_parts(tmp_path, parts=6, rows=100))
    with in_process():
        assert [len(g) for g in pool.groups(max_rows=100)] == [1] * 6
        assert [len(g) for g in pool.groups(min_rows=300, max_rows=100)] == [3, 3]  # pieces must not be inlined


def test_lookup_reads_only_the_parts_whose_names_hold_the_rows(tmp_path, monkeypatch) -> None:
    from curate.core.parts import write_part

    for part in range(6):
        ids = np.arange(part * 100, (part + 1) * 100)
        write_part(pa.table({"uid": [f"u{i}" for i in ids], "row": pa.array(ids, pa.int64()), "status": ["ok"] * 100,
                             "phash": pa.array(ids * 3, pa.int64())}), str(tmp_path / "parts"))
    pool = Pool.from_parts(sorted((tmp_path / "parts").iterdir()))
    read: list[str] = []
    real_read = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda source, *a, **k: read.append(str(source)) or real_read(source, *a, **k))
    with in_process():
        found = pool.lookup(np.array([5, 250, 299]), ["phash"])
    assert found.column("phash").to_pylist() == [15, 750, 897]
    assert sorted(p.rsplit("/", 1)[1][:25] for p in read) == ["000000000000-000000000099", "000000000200-000000000299"]
