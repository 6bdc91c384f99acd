"""The ledger's promise as a property: for any pool, chunking, shard size and crash point, every input row ends as
exactly one ledger row, kept rows = manifest samples = tar samples, and a resumed run keeps what an uninterrupted one
keeps."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.core.pipeline import load_pipeline
from curate.demo.pool import make_pool, write_url_list
from curate.demo.server import FaultServer
from curate.core.ledger import check_run, read_ledger
from curate.core.parts import part_files
from curate.core.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _config(rows_per_chunk: int, samples_per_shard: int, batch_size: int):
    return load_pipeline(REPO / "pipelines" / "demo.yaml", [
        "download.timeout=0.4", "download.retries=1", "download.backoff=0.01", "download.threads=16",
        f"download.resources.batch_size={batch_size}", f"input.rows_per_chunk={rows_per_chunk}",
        f"output.samples_per_shard={samples_per_shard}",
    ])


def _kept(out: Path) -> set[str]:
    return {r["uid"] for r in read_ledger(out).to_pylist() if r["status"] == "kept"}


def _simulate_crash(out: Path, rng: random.Random) -> None:
    """Leave the output as a kill -9 could: some parts and shards missing, half-written temp files, no manifest."""
    for path in part_files(out):
        if rng.random() < 0.5:
            path.unlink()
    for tar in sorted((out / "shards").glob("*.tar")):
        if rng.random() < 0.5:
            tar.unlink()
        elif rng.random() < 0.5:
            tar.with_suffix(".parquet").unlink()  # tar renamed, index not yet written
    (out / "parts" / ".000000000000-000000000009-deadbeefdeadbeef.parquet.1.tmp").write_bytes(b"PAR1 half")
    (out / "shards" / ".00000.tar.tmp").write_bytes(b"half a tar")
    for name in ("manifest.json", "ledger.parquet"):
        (out / name).unlink(missing_ok=True)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(20, 70),
    seed=st.integers(0, 10_000),
    rows_per_chunk=st.integers(1, 40),
    samples_per_shard=st.integers(1, 30),
    batch_size=st.integers(1, 32),
    crash_seed=st.integers(0, 10_000),
)
def test_ledger_invariant_and_resume(tmp_path_factory, n, seed, rows_per_chunk, samples_per_shard, batch_size,
                                     crash_seed):
    root = tmp_path_factory.mktemp("prop")
    items = make_pool(root, n=n, seed=seed)
    with FaultServer(root / "files", slow_seconds=5.0) as server:
        urls = write_url_list(items, server.base_url, root / "urls.parquet")
        reference = root / "reference"
        run_pipeline(_config(rows_per_chunk, samples_per_shard, batch_size), input_path=str(urls),
                     output=reference, local=True, progress=False)
        assert check_run(reference, input_rows=n) == []
        ledger = read_ledger(reference)
        assert ledger.num_rows == n and len(set(ledger.column("uid").to_pylist())) == n

        resumed = root / "resumed"
        shutil.copytree(reference, resumed)
        _simulate_crash(resumed, random.Random(crash_seed))
        run_pipeline(_config(rows_per_chunk, samples_per_shard, batch_size), input_path=str(urls),
                     output=resumed, local=True, progress=False)
    assert check_run(resumed, input_rows=n) == []
    assert _kept(resumed) == _kept(reference)
    assert read_ledger(resumed).sort_by("uid").equals(read_ledger(reference).sort_by("uid"))


def test_resume_after_a_retried_batch_and_a_lost_one(tmp_path):
    """A retried task stored some rows twice under another batching, and the kill came before other rows were
    stored: the counts add up, but the rerun must still store the missing rows and drop the doubles."""
    import pyarrow.parquet as pq

    from curate.core.parts import write_part

    items = make_pool(tmp_path, n=60, seed=11)
    with FaultServer(tmp_path / "files", slow_seconds=5.0) as server:
        urls = write_url_list(items, server.base_url, tmp_path / "urls.parquet")
        out = tmp_path / "run"
        run_pipeline(_config(60, 25, 10), input_path=str(urls), output=out, local=True, progress=False)
        reference = _kept(out)
        parts = part_files(out)
        doubled = pq.read_table(parts[0]).slice(0, 5)
        write_part(doubled.slice(0, 4), str(out / "parts"))  # the retried batch: 4 rows again, another file
        lost = pq.read_table(parts[-1])
        assert lost.num_rows >= 4
        parts[-1].unlink()
        write_part(lost.slice(0, lost.num_rows - 4), str(out / "parts"))  # 4 rows never stored
        (out / "manifest.json").unlink()
        server.reset_counts()
        run_pipeline(_config(60, 25, 10), input_path=str(urls), output=out, local=True, progress=False)
        assert 1 <= sum(server.requests.values()) <= 8  # only the 4 lost rows were fetched again (plus retries)
    assert check_run(out, input_rows=60) == []
    assert _kept(out) == reference
