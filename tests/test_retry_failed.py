"""`curate run --retry-failed`: only rows whose failure was retryable are fetched again; the rest keep their result."""

from __future__ import annotations

from pathlib import Path

from curate.core.pipeline import load_pipeline
from curate.demo.pool import make_pool, write_url_list
from curate.demo.server import FaultServer
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _config():
    # the timeout well above a loaded machine's reply time (a 503 that takes 0.6 s must not read as a timeout) and
    # well below the slow route's 5 s
    return load_pipeline(REPO / "pipelines" / "demo.yaml", [
        "download.timeout=2.0", "download.retries=0", "input.rows_per_chunk=20", "output.samples_per_shard=15"])


def test_retry_failed_refetches_only_retryable_failures(tmp_path):
    items = make_pool(tmp_path, n=60, seed=5)
    with FaultServer(tmp_path / "files", slow_seconds=5.0) as server:
        urls = write_url_list(items, server.base_url, tmp_path / "urls.parquet")
        out = tmp_path / "run"
        run_pipeline(_config(), input_path=str(urls), output=out, local=True, progress=False)
        first = {r["url"]: r for r in read_ledger(out).to_pylist()}
        flaky = [u for u in first if "/flaky/" in u]
        assert flaky and all(first[u]["reason"] == "download:http_503" for u in flaky), \
            {u: first[u]["reason"] for u in flaky}

        server.reset_counts()
        run_pipeline(_config(), input_path=str(urls), output=out, local=True, progress=False)
        assert sum(n for p, n in server.requests.items() if p != "/robots.txt") == 0  # a plain rerun fetches nothing

        run_pipeline(_config(), input_path=str(urls), output=out, local=True, progress=False, retry_failed=True)
        fetched = {p for p, n in server.requests.items() if n and p != "/robots.txt"}
        base = server.base_url
    second = {r["url"]: r for r in read_ledger(out).to_pylist()}
    assert check_run(out) == []
    assert all(second[u]["status"] == "kept" for u in flaky)  # the 503 was passing: they succeed now
    retryable = {u for u, r in first.items() if r["reason"] in ("download:http_503", "download:http_500",
                                                                 "download:timeout")}
    assert {f"{base}{p}" for p in fetched} == retryable  # 404s, 403s and decode failures were not asked for
    for url, row in first.items():
        if url not in retryable:
            assert (second[url]["status"], second[url]["reason"]) == (row["status"], row["reason"])
