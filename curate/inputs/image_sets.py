"""Sets of images from outside the pool (decontamination's eval set, a target distribution) as input rows.

A folder of image files, WebDataset shards (a folder or a glob), or a parquet with an ``image_path`` column
(relative to the parquet). The rows point the download stage at local files, so the images go through the
pipeline's own per-sample stages (the runner's outside rows) and are compared with the pool like for like.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from curate.core.stage import OK
from curate.errors import CurateError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def image_set_rows(spec: str, prefix: str, setting: str) -> pa.Table:
    """A set of images from outside the pool as input rows whose image the download stage reads from a local file
    (offset, size): uids ``<prefix>:<file or shard/key>``; errors name the ``setting`` that gave ``spec``."""
    import glob

    path = Path(spec).expanduser()
    rows: list[dict] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "image_path" not in table.column_names:
            raise CurateError(f"{setting} {spec}: the parquet needs an image_path column")
        files = [path.parent / p for p in table.column("image_path").to_pylist()]
    elif path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        from curate.inputs.shards import iter_shard_rows

        tars = sorted(glob.glob(str(path / "*.tar"))) if path.is_dir() else sorted(glob.glob(str(path)))
        for tar in tars:
            with open(tar, "rb") as handle:
                for batch in iter_shard_rows(tar, handle):
                    rows += [{"name": f"{Path(tar).name}/{r['source_key']}", "file": tar,
                              "offset": r["source_offset"], "size": r["source_size"]} for r in batch
                             if r["source_offset"] is not None]
        files = []
    for file in files:
        if not file.exists():
            raise CurateError(f"{setting} {spec}: {file} does not exist")
        rows.append({"name": str(file.relative_to(path.parent if path.suffix == ".parquet" else path)),
                     "file": str(file), "offset": 0, "size": file.stat().st_size})
    if not rows:
        raise CurateError(f"{setting} {spec}: no {prefix} images found")
    n = len(rows)
    return pa.table({"uid": [f"{prefix}:{r['name']}" for r in rows], "row": pa.array(range(n), pa.int64()),
                     "url": [None] * n, "caption": [""] * n, "status": [OK] * n,
                     "reason": pa.nulls(n, pa.string()), "decided_by": pa.nulls(n, pa.string()),
                     "source_file": [r["file"] for r in rows], "source_offset": pa.array([r["offset"] for r in rows],
                                                                                          pa.int64()),
                     "source_size": pa.array([r["size"] for r in rows], pa.int64()),
                     "source_key": [r["name"] for r in rows]})
