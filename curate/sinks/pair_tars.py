"""Stored pairs as plain WebDataset tars (``{uid}.{ext}`` + ``{uid}.txt``), for training on parts of a run.

The bootstrapped scorer trains on folds of the pool and ``curate experiment`` on its raw and curated sets; both read
the images the per-sample pass stored, so nothing is downloaded or decoded twice.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import parts as part_store
from curate.core.atomic import AtomicFile
from curate.sinks.tars import add_member


def write_pair_tars(source: Path | list[Path], paths: list[Path], route: Callable[[str], Iterable[int]],
                    where: Callable[[pa.Table], pa.Array]) -> list[Path]:
    """Write every stored row that ``where`` selects (a boolean mask over a part's uid/status/image columns) into
    the tars ``route(uid)`` names (indexes into ``paths``; none, one or several). ``source``: a run folder (all its
    stored parts) or a list of part files. All tars are written under temp names and renamed at the end, so a crash
    leaves either every tar or none; tars that already exist are kept."""
    if all(p.exists() for p in paths):
        return paths
    parts = part_store.part_files(source) if isinstance(source, Path) else source
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    files = [AtomicFile(p) for p in paths]
    tars = [tarfile.open(fileobj=f.handle, mode="w") for f in files]
    try:
        for part in parts:
            table = pq.read_table(part, columns=["uid", "status", "image", "image_ext", "caption"])
            table = table.filter(pc.fill_null(where(table), False))
            for row in table.to_pylist():
                for index in route(row["uid"]):
                    for ext, data in ((row["image_ext"], row["image"]), ("txt", (row["caption"] or "").encode())):
                        add_member(tars[index], f"{row['uid']}.{ext}", data)
    except BaseException:
        for file in files:
            file.discard()
        raise
    for tar, file in zip(tars, files):
        tar.close()
        file.commit()
    return paths
