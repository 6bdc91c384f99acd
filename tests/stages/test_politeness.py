"""Per-host limits: concurrency, rate, and Retry-After honoured by every thread of a worker."""

from __future__ import annotations

import time

import pytest

from curate.demo.server import FaultServer
from curate.politeness import HostLimiter
from curate.stages.download import DownloadConfig, DownloadStage




def _stage(**overrides) -> DownloadStage:
    config = dict(timeout=5, retries=1, backoff=0.01, allow_private_networks=True, threads=12,
                  respect_robots_txt=False)
    stage = DownloadStage(DownloadConfig(**{**config, **overrides}))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def names(demo_pool):
    _, items = demo_pool
    return [item.name for item in items if item.kind == "clean"][:12]


@pytest.mark.parametrize("limit", [2, 6])
def test_per_host_concurrency(demo_pool, names, limit, download_outcomes):
    root, _ = demo_pool
    with FaultServer(root / "files", slow_seconds=0.3) as server:
        outcomes = download_outcomes(_stage(per_host_concurrency=limit), [server.url("slow", n) for n in names])
        assert outcomes == [("ok", None)] * len(names)
        assert 1 < server.max_in_flight <= limit


def test_per_host_rate(demo_pool, names, download_outcomes):
    root, _ = demo_pool
    with FaultServer(root / "files") as server:
        start = time.monotonic()
        assert download_outcomes(_stage(per_host_rate=10), [server.url("img", n) for n in names[:6]]) == [("ok", None)] * 6
        assert time.monotonic() - start >= 0.45  # 6 starts at 10/s: the last no sooner than 0.5 s after the first


def test_retry_after_holds_every_thread_for_that_host():
    limiter = HostLimiter(max_concurrent=4)
    limiter.back_off("a.example", 0.3)
    start = time.monotonic()
    with limiter.slot("b.example"):
        assert time.monotonic() - start < 0.1  # other hosts are not held
    with limiter.slot("a.example"):
        assert time.monotonic() - start >= 0.29
