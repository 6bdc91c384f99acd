"""kill -9 the whole `curate run` (driver and its Ray) at some moment, run the same command again: the kept set
equals an uninterrupted run's, no uid twice, and shards finished before the kill are not rewritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.demo.pool import make_pool, write_url_list
from curate.demo.server import FaultServer
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SETS = ["download.timeout=1", "download.retries=1", "download.backoff=0.05", "input.rows_per_chunk=40",
        "output.samples_per_shard=8", "download.resources.batch_size=16"]


@pytest.fixture(scope="module")
def served_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_pool")
    items = make_pool(root, n=240, seed=3)
    with FaultServer(root / "files", slow_seconds=10.0) as server:
        urls = write_url_list(items, server.base_url, root / "urls.parquet")
        # warm the flaky URLs so both runs see the same server behaviour
        yield urls, server


@pytest.fixture(scope="module")
def reference(served_pool, tmp_path_factory):
    from curate.core.pipeline import load_pipeline

    urls, _ = served_pool
    out = tmp_path_factory.mktemp("reference") / "run"
    run_pipeline(load_pipeline(REPO / "pipelines" / "demo.yaml", SETS), input_path=str(urls), output=out,
                 local=True, progress=False)
    return {r["uid"] for r in read_ledger(out).to_pylist() if r["status"] == "kept"}


def _command(urls: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "curate.cli", "run", str(REPO / "pipelines" / "demo.yaml"), "--input", str(urls),
           "--output", str(out), "--quiet"]
    for item in SETS:
        cmd += ["--set", item]
    return cmd


def _kill_when(cmd: list[str], ready, limit: float = 120.0) -> None:
    """Start the run in its own process group and SIGKILL the whole group as soon as ready() is true."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + limit
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before the moment we wanted to kill it"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.parametrize("moment", ["during_download", "during_shard_writing"])
def test_kill_and_resume(served_pool, reference, tmp_path, moment):
    urls, _ = served_pool
    out = tmp_path / "run"
    if moment == "during_download":
        _kill_when(_command(urls, out), lambda: len(list((out / "parts").glob("*.parquet"))) >= 2)
    else:
        _kill_when(_command(urls, out), lambda: len(list((out / "shards").glob("*.parquet"))) >= 1)
    assert not (out / "manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar") if p.with_suffix(".parquet").exists()} \
        if (out / "shards").exists() else {}

    done = subprocess.run(_command(urls, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert check_run(out) == []
    ledger = read_ledger(out)
    uids = ledger.column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 240
    assert {r["uid"] for r in ledger.to_pylist() if r["status"] == "kept"} == reference
    for tar, mtime in finished.items():
        assert tar.stat().st_mtime_ns == mtime, f"{tar.name} was finished before the kill and was rewritten"
    if moment == "during_shard_writing":
        assert finished, "the kill came after at least one shard was complete"
