"""The dedup tiers as Ray tasks over the stored parts (curate.core.pool, curate.core.fan_out): the same decisions as in one
process, and on Ray the driver reads no part file at all; it receives pairs of rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.dedup import bands, semantic
from curate.core.fan_out import fan_out, in_process, shuffle, task_count


def _pid(_shared, _part) -> int:
    return os.getpid()


def _add(shared: int, part: int) -> int:
    return shared + part


def _cut(shared: int, part: int) -> list[list[int]]:
    return [[part * shared + j] for j in range(shared)]


def _gather(_shared: int, partition: int, pieces: list[list[int]]) -> tuple[int, list[int]]:
    return partition, sorted(x for piece in pieces for x in piece)


def _planted_codes(n: int, pairs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    for i in range(pairs):  # copies a few bits away from an original
        flips = rng.choice(64, size=int(rng.integers(1, 9)), replace=False)
        codes[n - 1 - i] = codes[i] ^ np.int64(sum(1 << int(b) for b in flips) - (1 << 64 if 63 in flips else 0))
    return codes


def test_tasks_run_in_ray_workers_in_order(ray_session):
    assert task_count(1000) == 2 * int(ray_session.cluster_resources()["CPU"])
    pids = fan_out(_pid, None, list(range(4)), cpus_per_task=0.25)
    assert len(pids) == 4 and os.getpid() not in pids
    assert fan_out(_add, 10, [1, 2, 3]) == [11, 12, 13]


def test_shuffle_gives_each_reduce_task_its_piece_of_every_map_task(ray_session):
    for partitions in (1, 3):  # with one partition Ray stores a task's return value whole
        assert shuffle(_cut, _gather, partitions, [1, 2, 3], partitions) == \
            [(j, [part * partitions + j for part in (1, 2, 3)]) for j in range(partitions)]
        with in_process():
            assert shuffle(_cut, _gather, partitions, [1, 2, 3], partitions) == \
                [(j, [part * partitions + j for part in (1, 2, 3)]) for j in range(partitions)]


def test_phash_pairs_on_ray_equal_the_pairs_found_in_one_process(ray_session):
    codes = _planted_codes(20_000, 300, seed=5)
    left, right = bands.phash_pairs(codes, radius=8, seed=3)
    on_ray = set(zip(left.tolist(), right.tolist()))
    with in_process():
        left, right = bands.phash_pairs(codes, radius=8, seed=3)
    assert on_ray == set(zip(left.tolist(), right.tolist()))
    planted = {(i, 20_000 - 1 - i) for i in range(300)}
    assert len(planted & on_ray) >= 0.95 * len(planted)
    left, right = np.array(sorted(on_ray)).T
    assert (bands.hamming(codes[left], codes[right]) <= 8).all()


def test_semantic_pairs_on_ray_equal_the_pairs_found_in_one_process(ray_session):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    copies = rng.choice(3800, size=150, replace=False)
    x[3800 + np.arange(150)] = x[copies] + 0.01 * rng.normal(size=(150, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    left, right = semantic.semantic_pairs(x, threshold=0.97, clusters=8)
    found = set(zip(left.tolist(), right.tolist()))
    with in_process():
        left, right = semantic.semantic_pairs(x, threshold=0.97, clusters=8)
    assert found == set(zip(left.tolist(), right.tolist()))
    i, j = np.nonzero(np.triu(x @ x.T >= 0.97, k=1))
    brute = set(zip(i.tolist(), j.tolist()))
    assert found <= brute and len(brute) >= 150
    assert len(found) >= 0.95 * len(brute)


def test_in_process_keeps_work_in_this_process(ray_session):
    with in_process():
        assert fan_out(_pid, None, list(range(4))) == [os.getpid()] * 4
        assert task_count(1000) == 1


def _planted_parts(folder: Path, parts: int, rows_per_part: int) -> list[Path]:
    """Stored parts with exact, pHash and semantic duplicates planted across part boundaries, and a failed row."""
    rng = np.random.default_rng(2)
    n = parts * rows_per_part
    codes = _planted_codes(n, 200, seed=9)
    digests = [f"{i:064x}" for i in range(n)]
    for i in range(0, 300, 3):  # rows n-1000-i: exact copies (pHash copies: rows n-1..n-200; semantic: n-400..n-301)
        digests[n - 1000 - i] = digests[i + 7]
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    vectors[n - 400:n - 300] = vectors[:100] + 0.005 * rng.normal(size=(100, 16)).astype(np.float32)
    status = ["ok"] * n
    status[5] = "failed"
    paths = []
    for part in range(parts):
        rows = np.arange(part * rows_per_part, (part + 1) * rows_per_part)
        table = pa.table({
            "uid": [f"u{i:06d}" for i in rows], "row": pa.array(rows, pa.int64()), "status": [status[i] for i in rows],
            "sha256": [digests[i] for i in rows], "phash": pa.array(codes[rows], pa.int64()),
            "color_signature": [bytes(48)] * len(rows), "clip_model": ["m"] * len(rows),
            "image_embedding": pa.array([v.astype(np.float16).tolist() for v in vectors[rows]],
                                        pa.list_(pa.float16())),
            "clip_score": pa.array(1 - rows / n, pa.float32())})  # earlier rows survive
        paths.append(folder / f"{part:04d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def test_tiers_on_ray_read_parts_in_tasks_and_decide_as_in_one_process(ray_session, tmp_path, monkeypatch):
    from curate.core.decide import run_global_stages
    from curate.stages.dedup_exact import DedupExact, DedupExactConfig
    from curate.stages.dedup_phash import DedupPhash, DedupPhashConfig
    from curate.stages.dedup_semantic import DedupSemantic, DedupSemanticConfig

    parts = _planted_parts(tmp_path, parts=6, rows_per_part=1000)
    stages = [DedupExact(DedupExactConfig(pixels=False)), DedupPhash(DedupPhashConfig()),
              DedupSemantic(DedupSemanticConfig(threshold=0.99, clusters=4))]
    reads: list[list[str]] = []
    real_read = pq.read_table

    def spy(source, *args, **kwargs):  # only this process's reads: Ray workers import pyarrow themselves
        reads.append(kwargs.get("columns") or [])
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    on_ray, _ = run_global_stages(parts, stages)
    assert reads == []  # the driver got pairs and looked-up rows back from tasks; it read no part
    with in_process():
        here, _ = run_global_stages(parts, stages)
    assert reads and any("phash" in columns for columns in reads)  # the spy sees reads made in this process
    assert on_ray == here
    reasons = on_ray.count_by("reason")
    assert reasons["dedup:exact"] == 100 and reasons["dedup:phash"] >= 190 and reasons["dedup:semantic"] >= 95
    by_uid = on_ray.by_uid(parts)
    assert len(by_uid) == len(on_ray)
    assert "u000005" not in by_uid and "u000005" not in {d[3] for d in by_uid.values()}  # a failed row: not live
    order = [stage.name for stage in stages]
    for _, _, stage, target in by_uid.values():  # each points at a row still live when its stage decided
        assert target not in by_uid or order.index(by_uid[target][2]) > order.index(stage)
