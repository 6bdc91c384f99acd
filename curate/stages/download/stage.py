"""Download stage: fetch each URL over HTTP(S), then decode, resize and re-encode the image.

I/O-bound, so each worker runs a thread pool (created in setup) over the rows of its batch; decoding happens in the
same threads because Pillow releases the GIL. Every outcome is a row status: nothing a server sends fails the job.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import SplitResult, urljoin, urlsplit

import pyarrow as pa

from curate.stages.download.config import DownloadConfig
from curate.stages.download.guard import (
    ALLOWLISTED, PUBLIC, AddressPolicy, BlockedAddress, GuardedPools, ResolveError, Resolver,
)
from curate.stages.download.budget import Budget
from curate.stages.download.imaging import ImageRejected, decode_and_resize, limit_heap_growth
from curate.stages.download.politeness import HostLimiter
from curate.inputs.shards import read_member
from curate.stages.download.robots import RobotsCache, RobotsUnavailable, x_robots_opts_out
from curate.core.stage import FILTERED, RowOutcomes, Stage
from curate.stages.download.urls import (
    DEFAULT_PORTS, REDIRECT_STATUSES, FetchError, check_url, host_of, parse_retry_after,
)

log = logging.getLogger(__name__)


# The body of a redirect or an error answer is read and dropped, so that its keep-alive connection can serve the next
# request, only when it is this short and arrives this fast; otherwise the connection is closed unread.
DISCARD_MAX_BYTES = 64 * 1024
DISCARD_MAX_SECONDS = 0.5
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 §2.5: parse at least the first 500 KiB; we read exactly that much
# Failures that say nothing about the image: the next try may work. (429 and 5xx are handled by code.)
RETRYABLE_REASONS = frozenset({
    "download:timeout", "download:connection_error", "download:incomplete", "download:dns_unavailable",
    "download:robots_unavailable", "download:error",
})


class DownloadStage(Stage[DownloadConfig]):
    name = "download"
    Config = DownloadConfig
    funnel = (("download", "downloaded"), ("decode", "decoded"), ("resize", "resized"))

    def inputs(self) -> list[str]:
        return ["url"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {
            "image": pa.binary(),
            "image_ext": pa.string(),
            "sha256": pa.string(),
            "original_bytes": pa.int64(),
            "source_format": pa.string(),
            "width": pa.int32(),
            "height": pa.int32(),
            "original_width": pa.int32(),
            "original_height": pa.int32(),
            "fetch_seconds": pa.float32(),  # this row's fetch, retries and waits for the host included
        }

    def retryable(self, reason: str) -> bool:
        if reason in RETRYABLE_REASONS:
            return True
        code = reason.removeprefix("download:http_")
        return code.isdigit() and (code == "429" or code.startswith("5"))

    def setup(self) -> None:
        import urllib3

        cfg: DownloadConfig = self.config
        self._urllib3 = urllib3
        self._pools = GuardedPools(
            AddressPolicy(cfg.allow_private_networks, cfg.allowed_networks, cfg.allowed_hosts),
            Resolver(cfg.dns_cache_seconds), maxsize=cfg.threads,
        )
        self._threads = ThreadPoolExecutor(cfg.threads, thread_name_prefix="download")
        self._spec = cfg.resize_spec()
        self._robots = RobotsCache(self._fetch_robots, cfg.user_agent_token)
        self._hosts = HostLimiter(cfg.per_host_concurrency, cfg.per_host_rate)
        self._decode_budget = Budget(cfg.decode_memory_mb * 2**20)
        limit_heap_growth()
        from PIL import Image

        # Pillow refuses images over 2× its global limit when opening them; let ours (checked from the header,
        # before decoding) be the one that decides when it is the larger. Only this worker's process is affected.
        if Image.MAX_IMAGE_PIXELS is not None and cfg.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels

    def process(self, batch: pa.Table) -> pa.Table:
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        urls = batch.column("url").to_pylist()
        if "source_file" in batch.column_names:  # rows read from existing shards: their image is in a tar
            sources = zip(batch.column("source_file").to_pylist(), batch.column("source_offset").to_pylist(),
                          batch.column("source_size").to_pylist())
            jobs = [(url, source) for url, source in zip(urls, sources)]
        else:
            jobs = [(url, None) for url in urls]
        for i, result in enumerate(self._threads.map(self._download_one, jobs)):
            if isinstance(result, FetchError):
                (outcomes.filter if result.status == FILTERED else outcomes.fail)(i, result.reason)
                continue
            image, raw_size, digest, fetch_seconds = result
            for column, value in (
                ("image", image.data),
                ("image_ext", image.ext),
                ("sha256", digest),
                ("original_bytes", raw_size),
                ("source_format", image.source_format),
                ("width", image.width),
                ("height", image.height),
                ("original_width", image.original_width),
                ("original_height", image.original_height),
                ("fetch_seconds", fetch_seconds),
            ):
                outcomes.set(i, column, value)
        return outcomes.apply(batch)

    def _download_one(self, job: tuple[str | None, tuple | None]):
        """(DecodedImage, size, sha256, fetch seconds) or the FetchError that stops the row; one bad row never fails
        its batch."""
        url, source = job
        start = time.monotonic()
        try:
            raw = self._read_source(*source) if source and source[0] else self._fetch_with_retries(url)
        except FetchError as err:
            return err
        except Exception:  # a failure we did not foresee is this row's, not the batch's
            log.exception("download of %s failed unexpectedly", url)
            return FetchError("download:error")
        fetched = time.monotonic()
        try:
            image = decode_and_resize(raw, self._spec, self._decode_budget)
        except ImageRejected as err:
            return FetchError(err.reason)
        except Exception:
            log.exception("decoding %s failed unexpectedly", url)
            return FetchError("decode:error")
        return image, len(raw), hashlib.sha256(raw).hexdigest(), fetched - start

    def _fetch_with_retries(self, url: str | None) -> bytes:
        cfg: DownloadConfig = self.config
        host = host_of(url)
        for attempt in range(cfg.retries + 1):
            try:
                with self._hosts.slot(host):
                    return self._fetch(url)
            except FetchError as err:
                if err.retry_after is not None:
                    self._hosts.back_off(host, min(err.retry_after, cfg.max_retry_after))
                if not err.retryable or attempt == cfg.retries:
                    raise
                if err.retry_after is not None:
                    if err.retry_after > cfg.max_retry_after:
                        raise
                    continue  # the host limiter holds every request to this host until Retry-After has passed
                time.sleep(cfg.backoff * 2**attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _fetch(self, url: str | None, obey_opt_outs: bool = True, keep_first: int | None = None) -> bytes:
        """One attempt: follow redirects by hand (loops detected, none from a public address into the allowlist),
        enforce the total deadline and max_bytes, and (unless fetching robots.txt itself) the publisher's robots.txt
        and X-Robots-Tag on every hop. ``keep_first`` (robots.txt): keep that many bytes of a longer body instead of
        refusing it."""
        cfg: DownloadConfig = self.config
        exc = self._urllib3.exceptions
        check_url(url)
        deadline = time.monotonic() + cfg.timeout
        seen = {url}
        came_from_public = False
        for _ in range(cfg.max_redirects + 1):
            if deadline - time.monotonic() <= 0:
                raise FetchError("download:timeout", retryable=True)
            parts = urlsplit(url)
            pool, verdict = self._checked_pool(parts)
            if verdict == ALLOWLISTED and came_from_public:  # a stranger's server choosing what we fetch inside
                raise FetchError("download:blocked_redirect")
            came_from_public = came_from_public or verdict == PUBLIC
            if obey_opt_outs and cfg.respect_robots_txt:
                self._check_robots(parts.scheme, parts.netloc.rsplit("@", 1)[-1], url)
            response = self._request(pool, parts, deadline)
            reusable = False  # only a connection whose response was read to the end may serve another request
            try:
                status = response.status
                if status in REDIRECT_STATUSES:
                    reusable = self._discard_body(response, deadline)
                    location = response.headers.get("Location")
                    try:
                        url = urljoin(url, location) if location else None
                    except ValueError:
                        url = None
                    try:
                        check_url(url)
                    except FetchError:
                        raise FetchError("download:bad_redirect") from None
                    if url in seen:
                        raise FetchError("download:redirect_loop")
                    seen.add(url)
                    continue
                if status != 200:
                    reusable = self._discard_body(response, deadline)
                    retryable = status in (429, 500, 502, 503, 504)
                    retry_after = parse_retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
                    raise FetchError(f"download:http_{status}", retryable=retryable, retry_after=retry_after)
                if obey_opt_outs and cfg.respect_x_robots_tag and x_robots_opts_out(
                        response.headers.getlist("X-Robots-Tag"), cfg.user_agent_token):
                    raise FetchError("optout:x_robots_tag", status=FILTERED)
                body, reusable = self._read_body(response, deadline, keep_first)
                return body
            except (exc.HTTPError, OSError):  # a response that broke under us
                raise FetchError("download:connection_error", retryable=True) from None
            finally:
                if reusable:
                    response.release_conn()
                else:
                    response.close()
        raise FetchError("download:too_many_redirects")

    def _checked_pool(self, parts: SplitResult):
        """The connection pool for this hop's host, and the address policy's verdict on it. Every hop is resolved
        and checked again (before its robots.txt is asked for: that is a request too); the connection goes to the
        checked address."""
        try:
            return self._pools.pool(parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme])
        except BlockedAddress:
            raise FetchError("download:blocked_address") from None
        except ResolveError as err:
            reason = "download:dns_unavailable" if err.retryable else "download:dns_error"
            raise FetchError(reason, retryable=err.retryable) from None

    def _request(self, pool, parts: SplitResult, deadline: float):
        """GET this hop (no redirects followed, the body unread) within what is left of the deadline; a failure is
        a FetchError with its reason."""
        cfg: DownloadConfig = self.config
        exc = self._urllib3.exceptions
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("download:timeout", retryable=True)
        timeout = self._urllib3.Timeout(connect=min(cfg.connect_timeout, remaining), read=remaining)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        try:
            return pool.urlopen(
                "GET", target, redirect=False, retries=False, preload_content=False, timeout=timeout,
                assert_same_host=False, headers={"Host": host_header, "User-Agent": cfg.user_agent},
            )
        except exc.NewConnectionError:  # refused, unreachable, DNS failure (a subclass of the timeout error)
            raise FetchError("download:connection_error", retryable=True) from None
        except (exc.TimeoutError, exc.MaxRetryError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, exc.NewConnectionError):
                raise FetchError("download:connection_error", retryable=True) from None
            if isinstance(reason, exc.TimeoutError) or isinstance(err, exc.TimeoutError):
                raise FetchError("download:timeout", retryable=True) from None
            raise FetchError("download:connection_error", retryable=True) from None
        except (exc.LocationValueError, exc.LocationParseError, ValueError):
            raise FetchError("download:invalid_url") from None
        except (exc.HTTPError, OSError):
            raise FetchError("download:connection_error", retryable=True) from None

    def _read_source(self, path: str, offset: int | None, size: int | None) -> bytes:
        """An image already downloaded, inside an input shard: read by range, no network."""
        cfg: DownloadConfig = self.config
        if offset is None or size is None:
            raise FetchError("read:no_image")
        if size > cfg.max_bytes:
            raise FetchError("download:too_large")
        try:
            data = read_member(path, offset, size)
        except OSError:
            raise FetchError("read:unreadable", retryable=True) from None
        if len(data) != size:
            raise FetchError("read:truncated")
        return data

    def _check_robots(self, scheme: str, netloc: str, url: str) -> None:
        try:
            if not self._robots.allowed(f"{scheme}://{netloc}", url):
                raise FetchError("optout:robots_txt", status=FILTERED)
        except RobotsUnavailable as err:
            raise FetchError(err.reason or "download:robots_unavailable", retryable=True) from None

    def _fetch_robots(self, url: str) -> tuple[int, bytes]:
        """(status, body) of a robots.txt: a 4xx is an answer (no rules), a network failure is not."""
        try:
            return 200, self._fetch(url, obey_opt_outs=False, keep_first=ROBOTS_MAX_BYTES)
        except FetchError as err:
            if err.reason.startswith("download:http_"):
                return int(err.reason.rsplit("_", 1)[1]), b""
            if err.reason in ("download:blocked_address", "download:blocked_redirect"):
                return 404, b""  # not ours to read there: no rules (the image request is checked the same way)
            raise

    def _discard_body(self, response, deadline: float) -> bool:
        """Read and drop the body of a redirect or an error answer; True when it ended, so that the connection can
        serve another request. A body longer than DISCARD_MAX_BYTES or slower than DISCARD_MAX_SECONDS is left
        unread (the caller closes the connection): a server must not hold the thread, or make us read without end,
        with a body nobody wants. The status already said what the row needs, so no failure here changes it."""
        exc = self._urllib3.exceptions
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > DISCARD_MAX_BYTES:
            return False
        sock = getattr(response.connection, "sock", None)
        if sock is None:  # the server closes the connection after this answer: nothing to keep it for
            return False
        until = min(deadline, time.monotonic() + DISCARD_MAX_SECONDS)
        size = 0
        try:
            while time.monotonic() < until:
                # no read outlasts the slice (a reused connection gets its own timeout back with its next request)
                sock.settimeout(max(0.01, until - time.monotonic()))
                chunk = response.read1(DISCARD_MAX_BYTES, decode_content=False)
                if not chunk:
                    return True
                size += len(chunk)
                if size > DISCARD_MAX_BYTES:
                    return False
        except (exc.HTTPError, OSError):  # timed out or broken
            pass
        return False

    def _read_body(self, response, deadline: float, keep_first: int | None = None) -> tuple[bytes, bool]:
        """The body and whether it was read to its end: all of it, up to max_bytes (else download:too_large), or with
        ``keep_first`` its first bytes however long it is (an empty body is then an answer too)."""
        cfg: DownloadConfig = self.config
        exc = self._urllib3.exceptions
        limit = keep_first or cfg.max_bytes
        declared = response.headers.get("Content-Length")
        if keep_first is None and declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            raise FetchError("download:too_large")
        chunks: list[bytes] = []
        size = 0
        try:
            # read1 returns what one socket read brings, so a server that trickles bytes cannot hold us past the
            # deadline (read(n) would wait for n bytes, each socket read with its own timeout)
            while True:
                if time.monotonic() > deadline:
                    raise FetchError("download:timeout", retryable=True)
                chunk = response.read1(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                chunks.append(chunk)
                if size > limit:
                    if keep_first is None:
                        raise FetchError("download:too_large")
                    return b"".join(chunks)[:keep_first], False
        except exc.TimeoutError:
            raise FetchError("download:timeout", retryable=True) from None
        except (exc.ProtocolError, exc.HTTPError, OSError):
            raise FetchError("download:incomplete", retryable=True) from None
        if not size and keep_first is None:
            raise FetchError("download:empty_body")
        return b"".join(chunks), True
