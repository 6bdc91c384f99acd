"""DownloadStage against the loopback fault server: every outcome is a row status, and the stage never raises."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from curate.demo.server import FaultServer
from curate.core.schema import BASE_COLUMNS
from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage

TIMEOUT, RETRIES = 1.5, 1


def make_stage(**overrides) -> DownloadStage:
    config = dict(timeout=TIMEOUT, retries=RETRIES, backoff=0.05, threads=16, image_size=64,
                  allow_private_networks=True)
    stage = DownloadStage(DownloadConfig(**{**config, **overrides}))
    stage.setup()
    return stage


def batch(urls: list[str | None]) -> pa.Table:
    n = len(urls)
    return pa.table({
        "uid": [f"u{i:03d}" for i in range(n)],
        "row": pa.array(range(n), pa.int64()),
        "url": pa.array(urls, pa.string()),
        "caption": [f"caption {i}" for i in range(n)],
        "status": ["ok"] * n,
        "reason": pa.nulls(n, pa.string()),
        "decided_by": pa.nulls(n, pa.string()),
    }, schema=pa.schema(BASE_COLUMNS))


def outcomes(table: pa.Table) -> list[tuple[str, str | None]]:
    return list(zip(table.column("status").to_pylist(), table.column("reason").to_pylist()))


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


@pytest.fixture(scope="module")
def files(demo_pool) -> Path:
    return demo_pool[0] / "files"


@pytest.fixture(scope="module")
def names(demo_pool) -> dict[str, list[str]]:
    """File names by planted kind."""
    by_kind: dict[str, list[str]] = {}
    for item in demo_pool[1]:
        by_kind.setdefault(item.kind, []).append(item.name)
    return by_kind


ROUTES = {  # route -> expected (status, reason), requests per path (retries + 1 for retryable failures)
    "img": (("ok", None), 1),
    "missing": (("failed", "download:http_404"), 1),
    "forbidden": (("failed", "download:http_403"), 1),
    "error": (("failed", "download:http_500"), RETRIES + 1),
    "flaky": (("ok", None), 2),
    "redirect": (("ok", None), 1),
    "loop": (("failed", "download:redirect_loop"), 1),
    "reset": (("failed", "download:connection_error"), RETRIES + 1),
    "lying": (("failed", "download:incomplete"), RETRIES + 1),
}


@pytest.fixture(scope="module")
def mixed(fault_server: FaultServer, names):
    """One batch with every route (each on its own clean file) and invalid URLs, processed once."""
    clean = names["clean"][-len(ROUTES):]  # the pool's URL list never puts these on a fault route
    urls = [fault_server.url(route, name) for route, name in zip(ROUTES, clean)]
    urls += ["ftp://127.0.0.1/x.jpg", "not a url", "", None, "http://", "http://127.0.0.1:99999/x.jpg"]
    before = {path_of(u): fault_server.requests[path_of(u)] for u in urls[: len(ROUTES)]}
    table = batch(urls)
    out = make_stage().process(table)
    counts = {path: fault_server.requests[path] - n for path, n in before.items()}
    return table, out, urls, counts


def test_every_route_outcome_and_request_count(mixed) -> None:
    """(The flaky row's retry may reuse a pooled connection: see test_error_responses_do_not_poison_...)"""
    _, out, urls, counts = mixed
    for i, (route, (expected, requests)) in enumerate(ROUTES.items()):
        assert outcomes(out)[i] == expected, route
        if route != "redirect":
            assert counts[path_of(urls[i])] == requests, route


def test_invalid_urls(mixed) -> None:
    _, out, _, _ = mixed
    assert outcomes(out)[len(ROUTES):] == [("failed", "download:unsupported_scheme")] + [
        ("failed", "download:invalid_url")] * 5


def test_rows_and_order_preserved(mixed) -> None:
    table, out, _, _ = mixed
    assert out.num_rows == table.num_rows
    for column in ("uid", "row", "url", "caption", "decided_by"):
        assert out.column(column).equals(table.column(column)), column
    stage = make_stage()
    for column, dtype in stage.outputs().items():
        assert out.schema.field(column).type == dtype, column
    failed = [i for i, (status, _) in enumerate(outcomes(out)) if status == "failed"]
    assert all(out.column("image")[i].as_py() is None for i in failed)


def test_ok_rows_carry_image_and_hash(mixed, files: Path) -> None:
    _, out, urls, _ = mixed
    rows = out.to_pylist()
    assert rows[0]["status"] == "ok"  # /img/; the other ok routes are checked when they succeeded
    for i, route in enumerate(ROUTES):
        if ROUTES[route][0][0] != "ok" or rows[i]["status"] != "ok":
            continue
        row, raw = rows[i], (files / urls[i].rsplit("/", 1)[1]).read_bytes()
        assert row["sha256"] == hashlib.sha256(raw).hexdigest(), route
        assert row["original_bytes"] == len(raw)
        with Image.open(files / urls[i].rsplit("/", 1)[1]) as source:
            assert (row["original_width"], row["original_height"]) == source.size
            assert row["source_format"] == {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}[source.format]
        assert (row["width"], row["height"]) == (64, 64) and row["image_ext"] == "jpg"
        with Image.open(io.BytesIO(row["image"])) as stored:
            assert stored.format == "JPEG" and stored.size == (64, 64)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("truncated", "decode:truncated"), ("not_an_image", "decode:not_an_image"),
     ("bomb", "decode:too_many_pixels"), ("too_small", "resize:too_small"), ("extreme_aspect", "resize:aspect_ratio")],
)
def test_bad_images_fail_with_decode_reason(fault_server: FaultServer, names, kind: str, reason: str) -> None:
    stage = make_stage(min_image_size=32, max_aspect_ratio=6)
    out = stage.process(batch([fault_server.url("img", names[kind][0])]))
    assert outcomes(out) == [("failed", reason)]


def test_slow_host_times_out(fault_server: FaultServer, names) -> None:
    url = fault_server.url("slow", names["clean"][-len(ROUTES) - 1])
    before = fault_server.requests[path_of(url)]
    start = time.monotonic()
    out = make_stage().process(batch([url]))
    elapsed = time.monotonic() - start
    assert outcomes(out) == [("failed", "download:timeout")]
    assert TIMEOUT * (RETRIES + 1) * 0.9 <= elapsed <= TIMEOUT * (RETRIES + 1) + 2.0
    assert fault_server.requests[path_of(url)] - before == RETRIES + 1


def test_max_bytes(fault_server: FaultServer, names, files: Path) -> None:
    name = names["clean"][0]
    size = (files / name).stat().st_size
    urls = [fault_server.url("img", name)] * 2
    assert outcomes(make_stage(max_bytes=size - 1).process(batch(urls))) == [("failed", "download:too_large")] * 2
    assert outcomes(make_stage(max_bytes=size).process(batch(urls))) == [("ok", None)] * 2


def test_redirects_count_against_max_redirects(fault_server: FaultServer, names) -> None:
    url = fault_server.url("redirect", names["clean"][1])
    assert outcomes(make_stage(max_redirects=0).process(batch([url]))) == [("failed", "download:too_many_redirects")]


def test_no_retries_means_one_request(fault_server: FaultServer, names) -> None:
    url = fault_server.url("error", names["clean"][2])
    before = fault_server.requests[path_of(url)]
    assert outcomes(make_stage(retries=0).process(batch([url]))) == [("failed", "download:http_500")]
    assert fault_server.requests[path_of(url)] - before == 1


def test_error_responses_do_not_poison_reused_connections(fault_server: FaultServer, names) -> None:
    """After a 404 the next request on the same keep-alive connection must not read the 404's unread body."""
    pairs = [(fault_server.url("missing", name), fault_server.url("img", name)) for name in names["clean"][:50]]
    urls = [url for pair in pairs for url in pair]
    out = make_stage(retries=0, threads=4).process(batch(urls))
    assert outcomes(out)[0::2] == [("failed", "download:http_404")] * len(pairs)
    assert outcomes(out)[1::2] == [("ok", None)] * len(pairs)


def test_connection_refused_is_a_connection_error() -> None:
    """Nothing listens on the port: the row says connection_error, not timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: connection refused
    out = make_stage().process(batch([f"http://127.0.0.1:{port}/x.jpg"]))
    assert outcomes(out) == [("failed", "download:connection_error")]


@pytest.mark.parametrize("url", ["http://[::1/x.jpg", "http://[zz]/x.jpg"])
def test_malformed_url_never_raises(fault_server: FaultServer, names, url: str) -> None:
    """A URL that urlsplit refuses is a bad row, not an exception that fails the whole batch."""
    good = fault_server.url("img", names["clean"][3])
    out = make_stage().process(batch([good, url, good]))
    assert outcomes(out) == [("ok", None), ("failed", "download:invalid_url"), ("ok", None)]


def test_empty_batch() -> None:
    out = make_stage().process(batch([]))
    assert out.num_rows == 0 and "image" in out.column_names


def test_a_server_that_trickles_bytes_cannot_outlast_the_total_timeout(fault_server: FaultServer, names) -> None:
    """Each byte arrives well within a socket timeout; only a deadline on the whole request stops it."""
    url = fault_server.url("drip", names["clean"][3])
    start = time.monotonic()
    out = make_stage(retries=0).process(batch([url]))
    elapsed = time.monotonic() - start
    assert outcomes(out) == [("failed", "download:timeout")]
    assert elapsed <= TIMEOUT + 1.0


def test_429_retry_after_is_waited_out_then_succeeds(fault_server: FaultServer, names) -> None:
    url = fault_server.url("busy", names["clean"][3])
    start = time.monotonic()
    out = make_stage(retries=1).process(batch([url]))
    assert outcomes(out) == [("ok", None)]
    assert fault_server.requests[path_of(url)] == 2
    assert time.monotonic() - start >= fault_server.busy_retry_after * 0.95


def test_429_without_retries_left_is_a_retryable_failure(fault_server: FaultServer, names) -> None:
    url = fault_server.url("busy", names["clean"][4])
    stage = make_stage(retries=0)
    assert outcomes(stage.process(batch([url]))) == [("failed", "download:http_429")]
    assert stage.retryable("download:http_429")


def test_endless_body_without_length_stops_at_max_bytes(fault_server: FaultServer, names) -> None:
    """Chunked, no Content-Length, never ending: the byte cap, not the deadline, ends it, and we stop reading."""
    url = fault_server.url("bloated", names["clean"][5])
    max_bytes = 1 << 20
    start = time.monotonic()
    out = make_stage(max_bytes=max_bytes, timeout=20).process(batch([url]))
    assert outcomes(out) == [("failed", "download:too_large")]
    assert time.monotonic() - start < 10
    time.sleep(0.2)  # let the server notice the hang-up
    # what the server got out before the hang-up: the cap plus what socket buffers hold, not a stream read to the end
    assert max_bytes < fault_server.bytes_sent[path_of(url)] < 32 * max_bytes
