"""FaultServer: every route over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from curate.demo.server import FaultServer

PAYLOAD = bytes(range(256)) * 40  # 10 KiB, every byte value


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "a.jpg").write_bytes(PAYLOAD)
    (tmp_path / "b.png").write_bytes(b"\x89PNG fake")
    return tmp_path


@pytest.fixture()
def server(root: Path) -> Iterator[FaultServer]:
    with FaultServer(root, slow_seconds=0.2) as srv:
        yield srv


def raw_get(server: FaultServer, path: str, method: str = "GET") -> http.client.HTTPResponse:
    """http.client sends the path as written (requests/urllib3 would normalise '..' away)."""
    port = int(server.base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path)
    return conn.getresponse()


def test_base_url_and_url(server: FaultServer) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.url("img", "a.jpg") == server.base_url + "/img/a.jpg"


def test_img_serves_file_with_headers(server: FaultServer) -> None:
    r = requests.get(server.url("img", "a.jpg"), timeout=5)
    assert r.status_code == 200
    assert r.content == PAYLOAD
    assert r.headers["Content-Type"] == "image/jpeg"
    assert r.headers["Content-Length"] == str(len(PAYLOAD))
    assert requests.get(server.url("img", "b.png"), timeout=5).headers["Content-Type"] == "image/png"
    assert requests.get(server.url("img", "nope.jpg"), timeout=5).status_code == 404


def test_head_like_get_without_body(server: FaultServer) -> None:
    r = requests.head(server.url("img", "a.jpg"), timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(PAYLOAD))
    assert r.content == b""
    assert requests.head(server.url("forbidden", "a.jpg"), timeout=5).status_code == 403


@pytest.mark.parametrize(("route", "status"), [("missing", 404), ("forbidden", 403), ("error", 500)])
def test_status_routes(server: FaultServer, route: str, status: int) -> None:
    for _ in range(2):  # the same answer every time
        assert requests.get(server.url(route, "a.jpg"), timeout=5).status_code == status
    assert server.requests[f"/{route}/a.jpg"] == 2


def test_unknown_route_and_bad_names(server: FaultServer) -> None:
    assert requests.get(server.base_url + "/nope/a.jpg", timeout=5).status_code == 404
    assert requests.get(server.base_url + "/", timeout=5).status_code == 404
    assert raw_get(server, "/img/sub/a.jpg").status == 400
    assert raw_get(server, "/img/../a.jpg").status == 400
    assert raw_get(server, "/img/..%2Fa.jpg").status == 400
    assert raw_get(server, "/img/").status == 400


def test_flaky_first_503_then_200(server: FaultServer) -> None:
    url = server.url("flaky", "a.jpg")
    first = requests.get(url, timeout=5)
    assert first.status_code == 503
    assert first.headers["Retry-After"] == "0"
    second = requests.get(url, timeout=5)
    assert second.status_code == 200 and second.content == PAYLOAD
    assert server.requests["/flaky/a.jpg"] == 2
    # Flakiness is per path: another file starts with a 503 too.
    assert requests.get(server.url("flaky", "b.png"), timeout=5).status_code == 503


def test_redirect_is_followed(server: FaultServer) -> None:
    r = requests.get(server.url("redirect", "a.jpg"), timeout=5)
    assert r.status_code == 200 and r.content == PAYLOAD
    assert [h.status_code for h in r.history] == [302]
    assert r.url == server.url("img", "a.jpg")
    raw = raw_get(server, "/redirect/a.jpg")
    assert raw.status == 302 and raw.getheader("Location") == "/img/a.jpg"


def test_loop_raises_too_many_redirects(server: FaultServer) -> None:
    session = requests.Session()
    session.max_redirects = 5
    with pytest.raises(requests.TooManyRedirects):
        session.get(server.url("loop", "a.jpg"), timeout=5)
    assert server.requests["/loop/a.jpg"] == 6  # the first request plus five redirects


def test_reset_raises_connection_error(server: FaultServer) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url("reset", "a.jpg"), timeout=5)
    # The server survives a reset connection.
    assert requests.get(server.url("img", "a.jpg"), timeout=5).status_code == 200


def test_lying_raises_incomplete_read(server: FaultServer) -> None:
    with urllib.request.urlopen(server.url("lying", "a.jpg"), timeout=5) as resp:
        assert int(resp.headers["Content-Length"]) > len(PAYLOAD)
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
    assert info.value.partial == PAYLOAD
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # what requests calls the same failure
        requests.get(server.url("lying", "a.jpg"), timeout=5)


def test_slow_serves_after_delay(server: FaultServer) -> None:
    start = time.monotonic()
    r = requests.get(server.url("slow", "a.jpg"), timeout=5)
    assert r.status_code == 200 and r.content == PAYLOAD
    assert time.monotonic() - start >= 0.2


def test_slow_times_out_and_stop_is_prompt(root: Path) -> None:
    threads_before = threading.active_count()
    srv = FaultServer(root, slow_seconds=30.0).start()
    url = srv.url("slow", "a.jpg")
    with pytest.raises(requests.Timeout):
        requests.get(url, timeout=0.3)
    # A second client still waiting (no timeout) while we stop: stop must not wait for the 30 s sleep.
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            requests.get(url, timeout=None)
        except requests.RequestException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    waiter.start()
    time.sleep(0.2)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 1.0
    waiter.join(timeout=2.0)
    assert not waiter.is_alive() and len(errors) == 1  # the waiting client is hung up on, not served
    # The sleeping handler threads wake on stop too, rather than lingering for 30 s.
    deadline = time.monotonic() + 1.0
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= threads_before


def test_keep_alive_reuses_one_connection(server: FaultServer) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    bodies = []
    for path in ("/img/a.jpg", "/missing/a.jpg", "/img/b.png"):
        conn.request("GET", path)
        resp = conn.getresponse()
        bodies.append((resp.status, resp.read()))
        assert not resp.will_close
    assert [status for status, _ in bodies] == [200, 404, 200]
    assert bodies[0][1] == PAYLOAD
    conn.close()


def test_counts_and_reset(server: FaultServer) -> None:
    requests.get(server.url("img", "a.jpg") + "?x=1", timeout=5)
    requests.get(server.url("img", "a.jpg"), timeout=5)
    assert server.requests == {"/img/a.jpg": 2}  # query strings do not split the count
    server.reset_counts()
    assert sum(server.requests.values()) == 0


def test_url_before_start_raises(root: Path) -> None:
    with pytest.raises(RuntimeError, match="not started"):
        FaultServer(root).url("img", "a.jpg")


def test_concurrent_requests(server: FaultServer) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def fetch() -> None:
        status = requests.get(server.url("img", "a.jpg"), timeout=5).status_code
        with lock:
            results.append(status)

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20
    assert server.requests["/img/a.jpg"] == 20  # increments are not lost under concurrency
