"""The dedup tiers' inner loops as Ray tasks (curate.fan_out): same pairs as in one process, work in other processes."""

from __future__ import annotations

import os

import numpy as np

from curate import dedup
from curate.fan_out import fan_out, in_process, task_count


def _pid(_shared, _part) -> int:
    return os.getpid()


def _add(shared: int, part: int) -> int:
    return shared + part


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


def test_phash_pairs_on_ray_equal_the_pairs_found_in_one_process(ray_session):
    codes = _planted_codes(20_000, 300, seed=5)
    left, right = dedup.phash_pairs(codes, radius=8, seed=3)
    on_ray = set(zip(left.tolist(), right.tolist()))
    with in_process():
        left, right = dedup.phash_pairs(codes, radius=8, seed=3)
    assert on_ray == set(zip(left.tolist(), right.tolist()))
    planted = {(i, 20_000 - 1 - i) for i in range(300)}
    assert len(planted & on_ray) >= 0.95 * len(planted)
    left, right = np.array(sorted(on_ray)).T
    assert (dedup.hamming(codes[left], codes[right]) <= 8).all()


def test_semantic_pairs_on_ray_equal_the_pairs_found_in_one_process(ray_session):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    copies = rng.choice(3800, size=150, replace=False)
    x[3800 + np.arange(150)] = x[copies] + 0.01 * rng.normal(size=(150, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert task_count(len(x) // 1000) > 1  # cluster assignment and the in-cluster search both fan out
    left, right = dedup.semantic_pairs(x, threshold=0.97, clusters=8)
    found = set(zip(left.tolist(), right.tolist()))
    with in_process():
        left, right = dedup.semantic_pairs(x, threshold=0.97, clusters=8)
    assert found == set(zip(left.tolist(), right.tolist()))
    i, j = np.nonzero(np.triu(x @ x.T >= 0.97, k=1))
    brute = set(zip(i.tolist(), j.tolist()))
    assert found <= brute and len(brute) >= 150
    assert len(found) >= 0.95 * len(brute)


def test_in_process_keeps_work_in_this_process(ray_session):
    with in_process():
        assert fan_out(_pid, None, list(range(4))) == [os.getpid()] * 4
        assert task_count(1000) == 1
