"""A loopback HTTP server with planted faults, used by `curate demo`, tests and benchmarks.

Each route plants one failure a real crawl meets (404, 403, 500, a 503 that clears on retry, a slow host,
redirects, a redirect loop, a reset connection, a body shorter than its Content-Length, a 429 with Retry-After,
an endless chunked body that declares no length), so the download stage
can be exercised end to end without the network. Standard library only.

    with FaultServer(root) as server:
        server.url("flaky", "000012.jpg")   # -> "http://127.0.0.1:PORT/flaky/000012.jpg"
"""

from __future__ import annotations

import collections
import itertools
import mimetypes
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

_ROUTES = frozenset(
    {"img", "missing", "forbidden", "error", "flaky", "busy", "slow", "redirect", "loop", "reset", "lying", "drip",
     "bloated", "to", "tagged"}
)
DRIP_SECONDS = 0.2  # the drip route sends one byte this often: every read succeeds, the whole never ends in time
_STATUS_ONLY = {"missing": 404, "forbidden": 403, "error": 500}


class FaultServer:
    """Serves the files under `root` on 127.0.0.1 (an OS-chosen port) through fault-planting routes.

    `requests` counts requests per path (query string dropped) so tests can assert retries, and that a rerun
    fetches nothing. The flaky route's "first request" is per server lifetime: `reset_counts` does not re-arm it.
    """

    def __init__(
        self,
        root: Path,
        *,
        slow_seconds: float = 30.0,
        busy_retry_after: int = 1,
        robots_txt: str | None = None,
        x_robots_tag: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.slow_seconds = slow_seconds
        self.busy_retry_after = busy_retry_after  # the Retry-After seconds of the busy route's first answer
        self.bytes_sent: collections.Counter[str] = collections.Counter()  # body bytes of the bloated route
        self.robots_txt = robots_txt  # served at /robots.txt (404 when None)
        self.x_robots_tag = x_robots_tag  # sent with files served by the "tagged" route
        self.requests: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests handled at once, for per-host concurrency tests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first_seen: set[str] = set()
        self._conns: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultServer:
        if self._httpd is not None:
            raise RuntimeError("FaultServer already started")
        self._stop.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.fault = self
        # A short poll interval so stop() (which waits for serve_forever to notice) returns promptly.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-server", daemon=True
        )
        self._httpd = httpd
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting, wakes sleeping /slow/ handlers and drops open keep-alive connections."""
        if self._httpd is None:
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive handlers would otherwise block in readline until their timeout
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FaultServer not started: call start() or use it as a context manager")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, route: str, name: str) -> str:
        return f"{self.base_url}/{route}/{quote(name)}"

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0

    # --- used by the handler threads ---

    def _count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def _first_request(self, path: str) -> bool:
        with self._lock:
            first = path not in self._first_seen
            self._first_seen.add(path)
            return first

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck handler never keeps the process alive
    block_on_close = False  # server_close() must not wait for sleeping handlers
    request_queue_size = 256  # the default backlog of 5 drops SYNs under a parallel downloader: 1 s stalls
    fault: FaultServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that time out or hang up mid-response are expected here; stay quiet about those.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    timeout = 30  # an idle keep-alive connection does not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would add ~40 ms per response
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        pass  # quiet: tests and `curate demo` should not print a line per request

    def setup(self) -> None:
        super().setup()
        self.server.fault._track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fault._track(self.connection, alive=False)

    def do_GET(self) -> None:
        fault = self.server.fault
        with fault._lock:
            fault.in_flight += 1
            fault.max_in_flight = max(fault.max_in_flight, fault.in_flight)
        try:
            self._route(send_body=True)
        finally:
            with fault._lock:
                fault.in_flight -= 1

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        fault = self.server.fault
        path = urlsplit(self.path).path
        fault._count(path)
        _, route, name = (path.split("/", 2) + ["", ""])[:3]  # "/img/a.jpg" -> "", "img", "a.jpg"
        name = unquote(name)
        if path == "/robots.txt" and fault.robots_txt is not None:
            return self._reply(200, fault.robots_txt.encode(), send_body=send_body)
        if route not in _ROUTES:
            return self._reply(404, b"no such route\n", send_body=send_body)
        if route == "to":  # /to/<quoted URL>: a redirect anywhere, for testing what a client does with it
            return self._reply(302, b"", headers={"Location": name}, send_body=send_body)
        if not name or "/" in name or "\\" in name or ".." in name or "\x00" in name:
            return self._reply(400, b"bad file name\n", send_body=send_body)
        if route in _STATUS_ONLY:
            return self._reply(_STATUS_ONLY[route], f"{route}\n".encode(), send_body=send_body)
        if route == "redirect":
            return self._reply(302, b"", headers={"Location": f"/img/{quote(name)}"}, send_body=send_body)
        if route == "loop":
            return self._reply(302, b"", headers={"Location": f"/loop/{quote(name)}"}, send_body=send_body)
        if route == "reset":
            # Linger 0 makes the close send a RST: the client sees a reset connection and no response at all.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return None
        if route == "flaky" and fault._first_request(path):
            return self._reply(503, b"try again\n", headers={"Retry-After": "0"}, send_body=send_body)
        if route == "busy" and fault._first_request(path):
            return self._reply(429, b"slow down\n", headers={"Retry-After": str(fault.busy_retry_after)},
                               send_body=send_body)
        if route == "slow" and fault._stop.wait(fault.slow_seconds):
            self.close_connection = True  # stopped while sleeping: hang up without answering
            return None
        file = fault.root / name
        if not file.is_file():
            return self._reply(404, b"not found\n", send_body=send_body)
        data = file.read_bytes()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if route == "lying":
            # Promise more bytes than are sent, then hang up: a truncated transfer.
            self._reply(200, data, ctype=ctype, send_body=send_body, length=2 * len(data) + 1024)
            self.close_connection = True
            return None
        if route == "drip":
            self._reply(200, b"", ctype=ctype, send_body=False, length=len(data))
            for byte in data:
                if fault._stop.wait(DRIP_SECONDS):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            self.close_connection = True
            return None
        if route == "bloated":
            return self._bloat(path, data, ctype)
        if route == "tagged" and fault.x_robots_tag is not None:
            return self._reply(200, data, ctype=ctype, send_body=send_body, headers={"X-Robots-Tag": fault.x_robots_tag})
        return self._reply(200, data, ctype=ctype, send_body=send_body)

    def _bloat(self, path: str, data: bytes, ctype: str) -> None:
        """The file, then zeros without end, chunked with no Content-Length: only the client's own byte cap stops
        it. Bytes sent are counted per path."""
        fault = self.server.fault
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        filler = bytes(64 * 1024)
        try:
            for piece in itertools.chain([data], itertools.repeat(filler)):
                if fault._stop.is_set():
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                with fault._lock:
                    fault.bytes_sent[path] += len(piece)
        except OSError:
            pass  # the client hung up: what it should do

    def _reply(
        self,
        status: int,
        body: bytes,
        *,
        send_body: bool,
        ctype: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)
