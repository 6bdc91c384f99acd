"""Embeddings published under ``embeddings/``: uid, the model that made them, and L2-normalised float16 vectors,
one parquet file per stored part. Compare vectors of one model only (a bootstrapped run has one model per fold).
Every row that was embedded is there, whatever was later decided about it, so decisions over embeddings (semantic
dedup, thresholds) can be redone without a GPU.

Read them with pyarrow (the folder is one dataset)::

    t = pq.read_table("out/embeddings"); vectors = np.stack(t["image_embedding"].to_numpy(zero_copy_only=False))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.atomic import atomic_file

from curate.core.schema import is_embedding_column

EMBEDDINGS = "embeddings"
MODEL_KEY = b"model"


class EmbeddingWriter:
    """Writes the embedded rows of each part as the decide phase streams the parts; removes leftovers at close."""

    def __init__(self, out: Path) -> None:
        self.folder = Path(out) / EMBEDDINGS
        self.files: list[str] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        columns = [c for c in table.column_names if is_embedding_column(c)]
        if not columns:
            return
        table = table.filter(pc.is_valid(table.column(columns[0])))
        if not table.num_rows:
            return
        metadata = {}
        if "clip_model" in table.column_names:
            metadata[MODEL_KEY] = str(table.column("clip_model")[0].as_py()).encode()
        # each row's model too: bootstrapped scores come from one model per fold, whose spaces differ
        kept = ["uid", *(["clip_model"] if "clip_model" in table.column_names else []), *columns]
        rows = table.select(kept).replace_schema_metadata(metadata)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{len(self.files):05d}.parquet"
        with atomic_file(self.folder / name) as handle:
            pq.write_table(rows, handle)
        self.files.append(f"{EMBEDDINGS}/{name}")
        self.rows += rows.num_rows

    def close(self) -> None:
        """Files past this run's last one are an earlier run's (e.g. before a rerun with fewer parts)."""
        if not self.folder.exists():
            return
        keep = {Path(f).name for f in self.files}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink()


def read_embeddings(out: Path, column: str = "image_embedding") -> tuple[list[str], np.ndarray]:
    """(uids, float16 matrix of shape (n, dim)) from a run's embeddings/ folder."""
    table = pq.read_table(Path(out) / EMBEDDINGS, columns=["uid", column])
    values = table.column(column).combine_chunks()
    return table.column("uid").to_pylist(), values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<halffloat> column as an (n, dim) float16 array (rows must all be present)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError("embedding column has missing rows")
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(array), -1) if len(array) else flat.reshape(0, 0)
