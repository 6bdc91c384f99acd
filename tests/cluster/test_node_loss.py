"""A node lost mid-run: the second node's raylet is killed while its download actors work; the job still ends with
every uid in the ledger exactly once and the same kept set as an uninterrupted run."""

from __future__ import annotations

import signal
import time

import pyarrow.compute as pc

from curate.core.pipeline import load_pipeline
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline

SETS = ["download.timeout=1.5", "download.retries=1", "download.backoff=0.05", "output.samples_per_shard=40",
        "input.rows_per_chunk=20", "download.resources.batch_size=10"]


def _kept(out) -> set[str]:
    ledger = read_ledger(out)
    return set(pc.filter(ledger.column("uid"), pc.equal(ledger.column("status"), "kept")).to_pylist())


def _second_raylet(cluster):
    for proc in cluster.processes():
        cmdline = proc.cmdline()
        if cmdline and cmdline[0].endswith("/raylet") and any(p.endswith("/sockets/raylet.1") for p in cmdline):
            return proc
    return None


def test_the_job_completes_when_a_node_dies_mid_run(loopback_cluster, url_list, tmp_path):
    out = tmp_path / "run"
    sets = [*SETS, "download.per_host_rate=6"]  # ~20 s: the node dies mid-run
    args = ["pipelines/demo.yaml", "--address", loopback_cluster.dashboard, "--input", str(url_list),
            "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    submitted = loopback_cluster.curate("submit", *args)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    raylet = _second_raylet(loopback_cluster)
    assert raylet is not None
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((out / "parts").glob("*.parquet")), "nothing was stored before the deadline"
    assert not (out / "manifest.json").exists()  # mid-run
    raylet.send_signal(signal.SIGKILL)
    raylet.wait(timeout=30)

    followed = loopback_cluster.curate("logs", job_id, "--follow", "--address", loopback_cluster.dashboard,
                                       timeout=600)
    assert followed.returncode == 0, followed.stdout[-4000:] + followed.stderr[-2000:]
    assert check_run(out, 120) == []

    reference = tmp_path / "uninterrupted"
    run_pipeline(load_pipeline("pipelines/demo.yaml", SETS), input_path=str(url_list), output=reference, local=True,
                 progress=False)
    assert _kept(out) == _kept(reference)
