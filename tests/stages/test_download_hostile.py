"""Hostile servers: bodies nobody asked for (redirects, errors) and robots.txt files without end must cost a bounded
number of bytes and seconds, and every row still ends as exactly one outcome with a machine-readable reason.

The server is a raw socket on 127.0.0.1 so it can misbehave precisely, and it counts the body bytes it got out per
path (the kernel's socket buffers hold a few MiB more than the client read, so bounds leave room for them).
"""

from __future__ import annotations

import collections
import io
import socket
import threading
import time
from collections.abc import Callable

import pytest
from PIL import Image

from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage

MiB = 2**20
TRICKLE_SECONDS = 15.0  # a trickling body lasts this long: well past the 10 s deadline the tests use
TRICKLE_INTERVAL = 0.25  # one byte this often: every socket read succeeds long before its timeout
ENDLESS_CAP = 200 * MiB  # an "endless" body ends here, so that a client that reads it all still finishes
BIG_BODY = 100 * MiB
# What the server may get out before the client hangs up: what the client read, plus both sockets' buffers
# (loopback autotuning lets them grow to a few MiB each). The attacks send 100-200 MiB.
SENT_BOUND = 24 * MiB
TIMEOUT = 10.0
SLACK = 4.0  # a body nobody wants must not cost the row its deadline: it ends well inside TIMEOUT


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


Route = Callable[["HostileServer", str, socket.socket], bool]  # True: the connection may serve another request


class HostileServer:
    """Keep-alive HTTP/1.1; ``routes`` maps a path to its behaviour. Hostile answers do not say Connection: close,
    so the client sees a connection worth keeping, and has to decide what to do with the body."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes_sent: collections.Counter[str] = collections.Counter()  # body bytes the kernel accepted
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            buffered = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buffered:
                        data = conn.recv(4096)
                        if not data:
                            return
                        buffered += data
                    request, _, buffered = buffered.partition(b"\r\n\r\n")
                    path = request.split(b" ", 2)[1].decode("latin-1")
                    with self._lock:
                        self.requests[path] += 1
                    if not self.routes.get(path, not_found)(self, path, conn):
                        return
            except OSError:  # the client hung up mid-body: what a careful client does with a hostile one
                pass

    def send_body(self, path: str, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self._lock:
            self.bytes_sent[path] += len(data)


def head(status: str, *lines: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *lines]) + "\r\n\r\n").encode("latin-1")


def not_found(server: HostileServer, path: str, conn: socket.socket) -> bool:
    conn.sendall(head("404 Not Found", "Content-Length: 10") + b"not found\n")
    return True


def image(server: HostileServer, path: str, conn: socket.socket) -> bool:
    data = _jpeg()
    conn.sendall(head("200 OK", "Content-Type: image/jpeg", f"Content-Length: {len(data)}"))
    server.send_body(path, conn, data)
    return True


def trickle(status: str, *lines: str) -> Route:
    """Declares a long body, then sends one byte every TRICKLE_INTERVAL for TRICKLE_SECONDS."""
    def route(server: HostileServer, path: str, conn: socket.socket) -> bool:
        conn.sendall(head(status, "Content-Length: 1000", *lines))  # short enough to be worth reading
        end = time.monotonic() + TRICKLE_SECONDS
        while time.monotonic() < end and not server.stop.wait(TRICKLE_INTERVAL):
            server.send_body(path, conn, b"x")
        return False
    return route


def stalled(status: str, *lines: str) -> Route:
    """Declares a body, then sends nothing for TRICKLE_SECONDS."""
    def route(server: HostileServer, path: str, conn: socket.socket) -> bool:
        conn.sendall(head(status, "Content-Length: 1000", *lines))
        server.stop.wait(TRICKLE_SECONDS)
        return False
    return route


def endless(status: str, *lines: str, first: bytes = b"", filler: bytes = bytes(64 * 1024)) -> Route:
    """Chunked, no length: ``first``, then ``filler`` until ENDLESS_CAP bytes have gone out."""
    def route(server: HostileServer, path: str, conn: socket.socket) -> bool:
        conn.sendall(head(status, "Transfer-Encoding: chunked", *lines))
        sent, data = 0, first or filler
        while sent < ENDLESS_CAP and not server.stop.is_set():
            server.send_body(path, conn, b"%x\r\n%s\r\n" % (len(data), data))
            sent, data = sent + len(data), filler
        conn.sendall(b"0\r\n\r\n")
        return False
    return route


def big(status: str, *lines: str) -> Route:
    """Declares and sends BIG_BODY bytes as fast as the client takes them."""
    def route(server: HostileServer, path: str, conn: socket.socket) -> bool:
        conn.sendall(head(status, f"Content-Length: {BIG_BODY}", *lines))
        block = bytes(64 * 1024)
        for _ in range(BIG_BODY // len(block)):
            server.send_body(path, conn, block)
        return False
    return route


TO_IMAGE = "Location: /image.jpg"
UNWANTED_BODIES = {  # path -> (route, the row's expected outcome)
    "/trickle-404": (trickle("404 Not Found"), ("failed", "download:http_404")),
    "/trickle-302": (trickle("302 Found", TO_IMAGE), ("ok", None)),
    "/stalled-404": (stalled("404 Not Found"), ("failed", "download:http_404")),
    "/stalled-302": (stalled("302 Found", TO_IMAGE), ("ok", None)),
    "/endless-404": (endless("404 Not Found"), ("failed", "download:http_404")),
    "/endless-302": (endless("302 Found", TO_IMAGE), ("ok", None)),
    "/big-404": (big("404 Not Found"), ("failed", "download:http_404")),
    "/big-302": (big("302 Found", TO_IMAGE), ("ok", None)),
    "/big-503": (big("503 Service Unavailable", "Retry-After: 0"), ("failed", "download:http_503")),
}


@pytest.fixture
def hostile():
    server = HostileServer({"/image.jpg": image, **{path: route for path, (route, _) in UNWANTED_BODIES.items()}})
    yield server
    server.close()


def _stage(**overrides) -> DownloadStage:
    config = dict(timeout=TIMEOUT, retries=0, threads=4, image_size=32, max_bytes=1 * MiB,
                  allow_private_networks=True)
    stage = DownloadStage(DownloadConfig(**{**config, **overrides}))
    stage.setup()
    return stage


@pytest.mark.parametrize("path", list(UNWANTED_BODIES))
def test_unwanted_bodies_cost_bounded_time_and_bytes(hostile, download_outcomes, path):
    """The body of a redirect or an error is not what we came for: a server must not hold the thread with it
    (trickling or stalling) nor make us read it without end; the row's outcome is what the status said."""
    start = time.monotonic()
    outcome = download_outcomes(_stage(), [hostile.url(path)])
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # let the server notice the hang-up
    assert outcome == [UNWANTED_BODIES[path][1]]
    assert elapsed <= SLACK, f"{path} took {elapsed:.1f} s (deadline {TIMEOUT} s)"
    sent = hostile.bytes_sent[path]
    assert sent <= SENT_BOUND, f"{path}: the server got {sent / MiB:.0f} MiB out"


ROBOTS_RULE = b"User-agent: curate\nDisallow: /image.jpg\n"
PADDING = b"# " + b"p" * 1021 + b"\n"  # 1 KiB lines of comment


@pytest.mark.parametrize(("robots", "expected"), [
    (endless("200 OK", first=ROBOTS_RULE, filler=PADDING * 64), ("filtered", "optout:robots_txt")),
    (big("200 OK"), ("ok", None)),  # 100 MiB of NULs, declared: no rules in the first 500 KiB
], ids=["endless-with-rule", "declared-100MiB"])
def test_a_robots_txt_without_end_is_read_to_500_kib(download_outcomes, robots, expected):
    """RFC 9309: parse at least the first 500 KiB and do not fail on a longer file. Here the rule sits in the first
    bytes of an endless file (or a declared 100 MiB of nothing): it is obeyed, and we stop reading."""
    server = HostileServer({"/image.jpg": image, "/robots.txt": robots})
    try:
        outcome = download_outcomes(_stage(max_bytes=32 * MiB), [server.url("/image.jpg")])
        time.sleep(0.3)
        assert outcome == [expected]
        assert server.requests["/robots.txt"] == 1
        assert server.bytes_sent["/robots.txt"] <= SENT_BOUND, f"{server.bytes_sent['/robots.txt'] / MiB:.0f} MiB"
    finally:
        server.close()


def test_an_empty_robots_txt_allows_everything(download_outcomes):
    """A 200 with an empty body is a robots.txt without rules, not a failed download of every row of the host."""
    def empty(server: HostileServer, path: str, conn: socket.socket) -> bool:
        conn.sendall(head("200 OK", "Content-Length: 0"))
        return True

    server = HostileServer({"/image.jpg": image, "/robots.txt": empty})
    try:
        assert download_outcomes(_stage(), [server.url("/image.jpg")] * 2) == [("ok", None)] * 2
        assert server.requests["/robots.txt"] == 1
    finally:
        server.close()


HANG_SECONDS = 120.0  # a hanging server holds its connections this long: far past any deadline of the run


def silent(server: HostileServer, path: str, conn: socket.socket) -> bool:
    """Accepts the connection, reads the request, never answers."""
    server.stop.wait(HANG_SECONDS)
    return False


def stalls_mid_body(server: HostileServer, path: str, conn: socket.socket) -> bool:
    """A 200 image whose body stops after its first kilobyte, the connection left open."""
    data = _jpeg() + bytes(40_000)
    conn.sendall(head("200 OK", "Content-Type: image/jpeg", f"Content-Length: {len(data)}"))
    server.send_body(path, conn, data[:1024])
    server.stop.wait(HANG_SECONDS)
    return False


def test_hanging_servers_cannot_hang_a_run_on_the_default_path(ray_session, make_pipeline, tmp_path):
    """Where img2dataset can wait forever, a run on the embedded Ray ends: a server that never answers and one that
    stalls mid-body cost each row its deadline, and every row is one ledger row with its reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core.ledger import check_run, read_ledger
    from curate.core.runner import run_pipeline

    server = HostileServer({**{f"/image-{i}.jpg": image for i in range(8)}, **{f"/silent-{i}": silent for i in range(6)},
                            **{f"/stalled-{i}": stalls_mid_body for i in range(6)}})
    try:
        urls = [server.url(f"/silent-{i}") for i in range(6)] + [server.url(f"/stalled-{i}") for i in range(6)] \
            + [server.url(f"/image-{i}.jpg") for i in range(8)]
        listing = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"row {i}" for i in range(len(urls))]}), listing)
        out = tmp_path / "run"
        start = time.monotonic()
        run_pipeline(make_pipeline("download.timeout=2", "download.retries=0", "download.min_image_size=16"),
                     input_path=str(listing), output=out, progress=False)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert elapsed < HANG_SECONDS / 3, f"the run took {elapsed:.0f} s"
    assert check_run(out, len(urls)) == []
    outcome = {r["url"]: (r["status"], r["reason"]) for r in read_ledger(out).to_pylist()}
    assert all(outcome[u] == ("failed", "download:timeout") for u in urls[:6]), outcome
    assert all(outcome[u][0] == "failed" and outcome[u][1] in ("download:timeout", "download:incomplete")
               for u in urls[6:12]), outcome
    assert all(outcome[u] == ("kept", None) for u in urls[12:]), outcome
