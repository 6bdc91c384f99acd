"""Eval decontamination: pool rows that duplicate any eval image are filtered with ``dedup:eval_contamination``.

A model trained on a pool that holds its benchmark's images scores what it memorised. The eval images (a folder, WebDataset
shards, or a parquet with ``image_path``) go through the pipeline's own per-sample stages — the same decode, resize,
hashes and embedding model as the pool — so they are compared like for like: equal original bytes or decoded pixels,
pHashes within ``phash_radius`` whose colour grids agree, and, when the pipeline stores embeddings of one model,
cosine at or above ``semantic_threshold``. ``duplicate_of`` names the eval item (``eval:<file or key>``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup import DEFAULT_RADIUS, color_differences, phash_pairs
from curate.errors import CurateError
from curate.stage import OK, GlobalStage, Stage, StageConfig

REASON = "dedup:eval_contamination"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class DecontaminateConfig(StageConfig):
    stage: Literal["decontaminate"] = "decontaminate"
    eval: str = Field(description="eval images: a folder of image files, .tar shards (folder or glob), or a parquet "
                      "with an image_path column (relative to the parquet)")
    exact: bool = Field(True, description="compare original bytes and decoded pixels")
    phash_radius: int | None = Field(DEFAULT_RADIUS, ge=0, le=32, description="null: no perceptual comparison")
    max_color_difference: float = Field(28.0, ge=0, le=255)
    semantic_threshold: float | None = Field(0.95, gt=0, le=1, description="null: no embedding comparison")


def eval_rows(spec: str) -> pa.Table:
    """The eval set as input rows whose image the download stage reads from a local file (offset, size)."""
    import glob

    path = Path(spec).expanduser()
    rows: list[dict] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "image_path" not in table.column_names:
            raise CurateError(f"decontaminate.eval {spec}: the parquet needs an image_path column")
        files = [path.parent / p for p in table.column("image_path").to_pylist()]
    elif path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        from curate.stages.read_shards import iter_shard_rows

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
            raise CurateError(f"decontaminate.eval {spec}: {file} does not exist")
        rows.append({"name": str(file.relative_to(path.parent if path.suffix == ".parquet" else path)),
                     "file": str(file), "offset": 0, "size": file.stat().st_size})
    if not rows:
        raise CurateError(f"decontaminate.eval {spec}: no eval images found")
    n = len(rows)
    return pa.table({"uid": [f"eval:{r['name']}" for r in rows], "row": pa.array(range(n), pa.int64()),
                     "url": [None] * n, "caption": [""] * n, "status": [OK] * n,
                     "reason": pa.nulls(n, pa.string()), "decided_by": pa.nulls(n, pa.string()),
                     "source_file": [r["file"] for r in rows], "source_offset": pa.array([r["offset"] for r in rows],
                                                                                          pa.int64()),
                     "source_size": pa.array([r["size"] for r in rows], pa.int64()),
                     "source_key": [r["name"] for r in rows]})


class Decontaminate(GlobalStage):
    name = "decontaminate"
    Config = DecontaminateConfig
    fans_out = True

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.pipeline_stages: list[Stage] = []

    def inputs(self) -> list[str]:
        return ["sha256", "phash", "color_signature"]

    def optional_inputs(self) -> list[str]:
        return ["pixel_sha256", "image_embedding", "clip_model"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.string()}

    def bind(self, stages: list[Stage]) -> None:
        self.pipeline_stages = stages

    def _eval_records(self) -> pa.Table:
        """The eval images through the pipeline's per-sample stages, in this process (on its CPU: a driver without
        a GPU still runs a GPU stage's model)."""
        from curate.worker import StageWorker

        config: DecontaminateConfig = self.config  # type: ignore[assignment]
        table = eval_rows(config.eval)
        print(f"[decontaminate] {table.num_rows} eval images through "
              f"{', '.join(s.name for s in self.pipeline_stages)}", file=sys.stderr)
        for stage in self.pipeline_stages:
            if getattr(stage, "deferred", False):
                continue  # bootstrapped scorers: one model per fold, none of them fits eval images
            local = type(stage)(stage.config.model_copy(update={
                "resources": stage.config.resources.model_copy(update={"gpus": 0})}))
            table = StageWorker(local)(table)
        return table.filter(pc.equal(table.column("status"), OK))

    def decide(self, metadata: pa.Table) -> pa.Table:
        config: DecontaminateConfig = self.config  # type: ignore[assignment]
        evals = self._eval_records()
        matched: dict[int, str] = {}  # pool row → eval uid
        uids = metadata.column("uid").to_pylist()
        for column in ("sha256", "pixel_sha256") if config.exact else ():
            if column in metadata.column_names and column in evals.column_names:
                by_digest = dict(zip(evals.column(column).to_pylist(), evals.column("uid").to_pylist()))
                for i, digest in enumerate(metadata.column(column).to_pylist()):
                    if digest in by_digest:
                        matched.setdefault(i, by_digest[digest])
        if config.phash_radius is not None and evals.num_rows:
            self._match_phash(metadata, evals, config, matched)
        if config.semantic_threshold is not None and "image_embedding" in metadata.column_names \
                and "image_embedding" in evals.column_names:
            self._match_embeddings(metadata, evals, config.semantic_threshold, matched)
        rows = sorted(matched)
        return pa.table({"uid": pa.array([uids[i] for i in rows], pa.string()),
                         "status": pa.array(["filtered"] * len(rows), pa.string()),
                         "reason": pa.array([REASON] * len(rows), pa.string()),
                         "duplicate_of": pa.array([matched[i] for i in rows], pa.string())})

    @staticmethod
    def _match_phash(metadata: pa.Table, evals: pa.Table, config: DecontaminateConfig,
                     matched: dict[int, str]) -> None:
        """Pool and eval codes banded together; only pairs that cross the two sets count."""
        valid = np.flatnonzero(metadata.column("phash").is_valid().to_numpy(zero_copy_only=False))
        pool_codes = metadata.column("phash").to_numpy(zero_copy_only=False)[valid].astype(np.int64)
        eval_codes = evals.column("phash").to_numpy(zero_copy_only=False).astype(np.int64)
        left, right = phash_pairs(np.concatenate([pool_codes, eval_codes]), radius=config.phash_radius or 0)
        crossing = (left < len(pool_codes)) & (right >= len(pool_codes))
        left, right = left[crossing], right[crossing]
        signatures = metadata.column("color_signature").take(pa.array(valid)).to_pylist() + \
            evals.column("color_signature").to_pylist()
        close = color_differences(signatures, left, right) <= config.max_color_difference
        eval_uids = evals.column("uid").to_pylist()
        for pool_index, eval_index in zip(left[close], right[close]):
            matched.setdefault(int(valid[pool_index]), eval_uids[int(eval_index) - len(pool_codes)])

    @staticmethod
    def _match_embeddings(metadata: pa.Table, evals: pa.Table, threshold: float, matched: dict[int, str]) -> None:
        """Each pool row against its nearest eval image of the same model (faiss inner product on unit vectors)."""
        import faiss

        from curate.stages.dedup_semantic import unit_rows

        eval_uids = evals.column("uid").to_pylist()
        for model in set(evals.column("clip_model").to_pylist()):
            pool_rows = np.flatnonzero(pc.equal(metadata.column("clip_model"), model).to_numpy(zero_copy_only=False))
            eval_rows_ = np.flatnonzero(pc.equal(evals.column("clip_model"), model).to_numpy(zero_copy_only=False))
            if not len(pool_rows):
                continue
            targets = unit_rows(evals.column("image_embedding").take(eval_rows_))
            index = faiss.IndexFlatIP(targets.shape[1])
            index.add(targets)
            queries = unit_rows(metadata.column("image_embedding").take(pool_rows))
            similarity, nearest = index.search(queries, 1)
            for row, sim, j in zip(pool_rows, similarity[:, 0], nearest[:, 0]):
                if sim >= threshold:
                    matched.setdefault(int(row), eval_uids[int(eval_rows_[j])])
