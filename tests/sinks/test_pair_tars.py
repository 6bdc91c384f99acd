"""Pair tars (the bootstrapped scorer's folds, the experiment's raw and curated sets) go through the same tar member
writer as the shards: a rerun over the same stored rows writes byte-identical tars."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.parts import write_part
from curate.sinks.pair_tars import write_pair_tars


def stored_run(out: Path) -> None:
    n = 6
    write_part(pa.table({
        "uid": [f"u{i}" for i in range(n)], "row": list(range(n)),
        "status": ["ok", "ok", "failed", "ok", "ok", "ok"],
        "image": [bytes([i]) * (10 + i) for i in range(n)], "image_ext": ["jpg"] * n,
        "caption": [f"caption {i}" for i in range(n)],
    }), str(out / "parts"))


def write(out: Path, folder: Path) -> list[Path]:
    paths = [folder / "even.tar", folder / "odd.tar"]
    return write_pair_tars(out, paths, route=lambda uid: [int(uid[1:]) % 2],
                           where=lambda table: pc.equal(table.column("status"), "ok"))


def test_pair_tars_hold_the_selected_rows_and_rerun_byte_identical(tmp_path: Path) -> None:
    stored_run(tmp_path)
    first = write(tmp_path, tmp_path / "a")
    second = write(tmp_path, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    with tarfile.open(first[0]) as tar:
        assert tar.getnames() == ["u0.jpg", "u0.txt", "u4.jpg", "u4.txt"]  # u2 failed: not selected
        assert {(m.mtime, m.mode, m.uname) for m in tar.getmembers()} == {(0, 0o444, "bigdata")}  # as the shards
        assert tar.extractfile("u4.txt").read() == b"caption 4"
    with tarfile.open(first[1]) as tar:
        assert tar.getnames() == ["u1.jpg", "u1.txt", "u3.jpg", "u3.txt", "u5.jpg", "u5.txt"]
