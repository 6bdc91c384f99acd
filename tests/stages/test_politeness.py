"""Per-host limits: concurrency, rate, and Retry-After honoured by every thread of a worker."""

from __future__ import annotations

import time

import pytest

from curate.demo.server import FaultServer
from curate.stages.download.politeness import HostLimiter
from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage




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
        urls = [server.url("img", n) for n in names[:6]]
        assert download_outcomes(_stage(per_host_rate=10), urls) == [("ok", None)] * 6
        assert time.monotonic() - start >= 0.45  # 6 starts at 10/s: the last no sooner than 0.5 s after the first


def test_retry_after_holds_every_thread_for_that_host():
    limiter = HostLimiter(max_concurrent=4)
    limiter.back_off("a.example", 0.3)
    start = time.monotonic()
    with limiter.slot("b.example"):
        assert time.monotonic() - start < 0.1  # other hosts are not held
    with limiter.slot("a.example"):
        assert time.monotonic() - start >= 0.29


def test_a_worker_that_met_many_hosts_tracks_a_bounded_number_and_keeps_the_limits_in_force():
    """Each host once: the limiter forgets idle hosts, but not one with a request in flight (a fresh entry for it
    would let a second request start beside the first) nor one still inside its Retry-After."""
    import threading

    limiter = HostLimiter(max_concurrent=1)
    entered, release, second = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with limiter.slot("busy.example"):
            entered.set()
            release.wait(30)

    def again() -> None:
        with limiter.slot("busy.example"):
            second.set()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert entered.wait(5)
    limiter.back_off("resting.example", 2.0)
    resting_until = time.monotonic() + 2.0
    for i in range(15_000):
        with limiter.slot(f"h{i}.example"):
            pass
    assert len(limiter._slots) <= 5_000, f"{len(limiter._slots)} hosts tracked"
    follower = threading.Thread(target=again, daemon=True)
    follower.start()
    assert not second.wait(0.5), "a second request to busy.example started while the first was in flight"
    release.set()
    assert second.wait(5)
    with limiter.slot("resting.example"):
        assert time.monotonic() >= resting_until - 0.05
