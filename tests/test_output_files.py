"""Output files on a shared filesystem: temporary names nobody can guess or share, no write through a link planted at
one, and a finished shard kept on resume only when its bytes still hash to what its index recorded."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from curate.core.atomic import atomic_file, temporary_name, write_text_atomic
from curate.demo.pool import make_pool, write_url_list
from curate.demo.server import FaultServer
from curate.core.ledger import check_run, read_manifest
from curate.core.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SETS = ["download.timeout=2", "download.retries=0", "input.rows_per_chunk=40", "output.samples_per_shard=8"]


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs_pool")
    items = make_pool(root, n=40, seed=5)
    with FaultServer(root / "files", slow_seconds=10.0) as server:
        yield write_url_list(items, server.base_url, root / "urls.parquet")


def _run(urls: Path, out: Path) -> None:
    from curate.core.pipeline import load_pipeline

    run_pipeline(load_pipeline(REPO / "pipelines" / "demo.yaml", SETS), input_path=str(urls), output=out,
                 local=True, progress=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_link_planted_at_the_old_temporary_names_is_not_written_through(urls, tmp_path) -> None:
    out = tmp_path / "run"
    _run(urls, out)
    for name in ("shards/00000.tar", "shards/00000.parquet", "ledger.parquet", "manifest.json"):
        (out / name).unlink()  # as a run killed before its last writes leaves it
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # the names the writers used before: guessable, so anyone sharing the filesystem could plant them
    for name in ("shards/.00000.tar.tmp", "shards/.00000.parquet.tmp", ".ledger.parquet.tmp", ".manifest.json.tmp",
                 ".config.yaml.tmp"):
        (out / name).symlink_to(victim)
    _run(urls, out)
    assert victim.read_text() == "precious"
    assert check_run(out) == []
    assert not (out / "shards" / "00000.tar").is_symlink()


def test_a_shard_damaged_after_it_was_written_is_rewritten_on_resume(urls, tmp_path) -> None:
    out = tmp_path / "run"
    _run(urls, out)
    shard = out / read_manifest(out).shards[0].path
    good = _sha256(shard)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one byte changed: a size check alone trusts it
    shard.write_bytes(bytes(data))
    _run(urls, out)
    assert _sha256(shard) == good
    assert read_manifest(out).shards[0].sha256 == good
    assert check_run(out) == []


def test_temporary_names_are_unique_and_exclusive(tmp_path) -> None:
    target = tmp_path / "file.bin"
    names = {temporary_name(target) for _ in range(1000)}
    assert len(names) == 1000 and all(n.parent == tmp_path and n.name.startswith(".file.bin.") for n in names)
    barrier, errors = threading.Barrier(8), []

    def write(i: int) -> None:
        try:
            barrier.wait()
            with atomic_file(target) as handle:
                handle.write(str(i).encode() * 10_000)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content = target.read_bytes()
    assert len(set(content)) == 1 and len(content) == 10_000  # one writer's whole file, never two interleaved
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_a_failed_write_leaves_nothing_and_the_old_file_stands(tmp_path) -> None:
    target = tmp_path / "manifest.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
