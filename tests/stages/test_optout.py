"""Publisher opt-outs: X-Robots-Tag and robots.txt, addressed to our token, make a row `filtered` with the reason."""

from __future__ import annotations

import pytest

from curate.demo.server import FaultServer
from curate.stages.download.robots import x_robots_opts_out
from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage


@pytest.mark.parametrize("values, opted_out", [
    (["noai"], True),
    (["noimageai"], True),
    (["noindex, nofollow"], True),
    (["noimageindex"], True),
    (["none"], True),
    (["curate: noai"], True),
    (["CURATE: NoIndex"], True),
    (["otherbot: noai"], False),
    (["otherbot: noai", "curate: noimageindex"], True),
    (["nofollow"], False),
    (["unavailable_after: 25 Jun 2030 15:00:00 PST"], False),
    (["max-image-preview: none"], False),
    ([], False),
])
def test_x_robots_tag_parsing(values, opted_out):
    assert x_robots_opts_out(values, "curate") is opted_out




def _stage(**overrides) -> DownloadStage:
    stage = DownloadStage(DownloadConfig(timeout=2, retries=0, allow_private_networks=True, threads=4, **overrides))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def image_name(demo_pool):
    root, items = demo_pool
    return next(item.name for item in items if item.kind == "clean")


@pytest.mark.parametrize("tag, expected", [
    ("noai", ("filtered", "optout:x_robots_tag")),
    ("curate: noimageindex", ("filtered", "optout:x_robots_tag")),
    ("otherbot: noai", ("ok", None)),
    ("nofollow", ("ok", None)),
])
def test_x_robots_tag_filters_rows(demo_pool, image_name, tag, expected, download_outcomes):
    root, _ = demo_pool
    with FaultServer(root / "files", x_robots_tag=tag) as server:
        assert download_outcomes(_stage(), [server.url("tagged", image_name)]) == [expected]
        ignoring = _stage(respect_x_robots_tag=False)
        assert download_outcomes(ignoring, [server.url("tagged", image_name)]) == [("ok", None)]


def test_robots_txt_is_fetched_once_and_obeyed_for_our_token(demo_pool, image_name, download_outcomes):
    root, _ = demo_pool
    robots = "User-agent: curate\nDisallow: /tagged/\n\nUser-agent: *\nDisallow: /\n"
    with FaultServer(root / "files", robots_txt=robots) as server:
        stage = _stage()
        urls = [server.url("img", image_name)] * 3 + [server.url("tagged", image_name)] * 3
        assert download_outcomes(stage, urls) == [("ok", None)] * 3 + [("filtered", "optout:robots_txt")] * 3
        assert server.requests["/robots.txt"] == 1
        assert server.requests[f"/tagged/{image_name}"] == 0  # a disallowed URL is never requested
        download_outcomes(_stage(respect_robots_txt=False), [server.url("tagged", image_name)])
        assert server.requests[f"/tagged/{image_name}"] == 1


def test_a_robots_txt_that_fails_stops_the_row_without_fetching(demo_pool, image_name, tmp_path):
    """A 5xx robots.txt means 'assume disallowed, for now' (RFC 9309): the row fails as retryable."""
    from curate.stages.download.robots import RobotsCache, RobotsUnavailable

    cache = RobotsCache(lambda url: (503, b""), "curate")
    with pytest.raises(RobotsUnavailable):
        cache.allowed("http://127.0.0.1:1", "http://127.0.0.1:1/x.jpg")
    missing = RobotsCache(lambda url: (404, b""), "curate")
    assert missing.allowed("http://127.0.0.1:1", "http://127.0.0.1:1/x.jpg")


def test_user_agent_must_carry_its_token():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="user_agent_token"):
        DownloadConfig(user_agent="Mozilla/5.0")
    assert DownloadConfig(user_agent="mybot/1.0 (+https://example.org/bot)", user_agent_token="mybot")


def test_the_robots_cache_is_bounded_in_origins_and_in_bytes():
    """A worker meets many origins, some with 500 KiB robots.txt files: answers are kept, but not all of them."""
    from curate.stages.download.robots import RobotsCache

    cache = RobotsCache(lambda url: (404, b""), "curate")
    for i in range(15_000):
        assert cache.allowed(f"http://h{i}.example", f"http://h{i}.example/x.jpg")
    assert len(cache._rules) <= 5_000, f"{len(cache._rules)} origins cached"

    body = b"User-agent: curate\nDisallow: /private/\n" + (b"# " + b"p" * 1021 + b"\n") * 400  # 400 KiB
    large = RobotsCache(lambda url: (200, body), "curate")
    for i in range(100):
        assert not large.allowed(f"http://b{i}.example", f"http://b{i}.example/private/x.jpg")
    held = len(large._rules) * len(body)
    assert held <= 16 * 2**20, f"{len(large._rules)} robots.txt of 400 KiB cached: {held / 2**20:.0f} MiB"


def test_a_robots_answer_is_asked_for_again_after_its_ttl():
    """RFC 9309 §2.4: a cached robots.txt should not be used for more than 24 hours."""
    import time

    from curate.stages.download.robots import RobotsCache

    fetched: list[str] = []
    cache = RobotsCache(lambda url: (fetched.append(url), (404, b""))[1], "curate", ttl_seconds=0.2)
    assert cache.allowed("http://a.example", "http://a.example/x.jpg")
    assert cache.allowed("http://a.example", "http://a.example/y.jpg")
    assert len(fetched) == 1
    time.sleep(0.3)
    assert cache.allowed("http://a.example", "http://a.example/z.jpg")
    assert len(fetched) == 2
