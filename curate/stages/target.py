"""Target-distribution filtering (DataComp's "image-based" filter): keep the pool rows whose image falls in a
cluster that images of a target set (ImageNet's, in DataComp; the user's own domain here) fall in.

The target images (a folder, WebDataset shards, or a parquet with ``image_path``) are the stage's outside rows:
the runner sends them through the pipeline's own per-sample stages, so they are embedded by the same scoring model.
The pool's stored image embeddings are clustered with spherical k-means (fitted on a sample, per scoring model);
each target image votes for its nearest centroid; clusters are ranked by their votes and the top ones holding
``target_share`` of the votes are kept (1.0: every cluster some target image falls in, DataComp's rule). Rows in the
other clusters are filtered with ``target:far_from_target``. Intersected with ``alignment`` (both stages in one
pipeline) this is DataComp's best medium-scale baseline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.config import StageConfig
from curate.core.stage import GlobalStage, Removals
from curate.dedup.semantic import COLUMNS, cluster_count, embedding_samples, spherical_centroids, unit_rows
from curate.errors import CurateError
from curate.inputs.image_sets import image_set_rows

if TYPE_CHECKING:
    from curate.core.pool import Pool

REASON = "target:far_from_target"


class TargetConfig(StageConfig):
    stage: Literal["target"] = "target"
    images: str = Field(description="the target set: a folder of images, .tar shards (folder or glob), or a parquet "
                        "with an image_path column (relative to the parquet)")
    clusters: int | None = Field(None, ge=2, description="k-means clusters of the pool's embeddings (null: one per "
                                 "1000 embedded rows, at most one per 40 sampled; DataComp: 100k for 12.8M)")
    target_share: float = Field(1.0, gt=0, le=1, description="keep the clusters with the most target images until "
                                "they hold this share of them (1.0: every cluster a target image falls in)")
    fit_sample: int = Field(100_000, ge=100, description="pool rows sampled (by uid hash) to fit k-means on")
    seed: int = 0


class TargetFilter(GlobalStage[TargetConfig]):
    name = "target"
    Config = TargetConfig
    fans_out: ClassVar[bool] = True  # the sample and the assignment run in tasks beside the embeddings

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.targets: pa.Table | None = None
        self.kept_clusters: dict[str, int] = {}  # per model: clusters kept, for the log

    def inputs(self) -> list[str]:
        return list(COLUMNS)

    def outside_rows(self) -> pa.Table:
        return image_set_rows(self.config.images, "target", "target.images")

    def receive_outside(self, table: pa.Table) -> None:
        self.targets = table

    def decide_pool(self, pool: Pool) -> Removals:
        config: TargetConfig = self.config
        if self.targets is None:
            raise RuntimeError("target: its images were not run through the per-sample stages "
                               "(curate.core.runner.run_outside_rows runs them before deciding)")
        targets = _embedded_targets(self.targets)
        counts, samples = embedding_samples(pool, config.fit_sample, config.seed)
        missing = sorted(set(samples) - set(targets))
        if missing:
            raise CurateError(f"target: no target image was embedded by {missing[0]}, which embedded pool rows; "
                              "the target set goes through the pipeline's score stage, so use a pretrained model "
                              "(bootstrapped scorers embed each fold in a space of its own)")
        kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for model, rows in samples.items():
            centroids = spherical_centroids(rows, cluster_count(config.clusters, counts[model], rows.num_rows),
                                            config.seed)
            votes = np.bincount(_nearest(centroids, targets[model]), minlength=len(centroids))
            kept[model] = (centroids, _top_clusters(votes, config.target_share))
            self.kept_clusters[model] = len(kept[model][1])
            print(f"[target] {model}: {len(kept[model][1])} of {len(centroids)} clusters hold "
                  f"{config.target_share:.0%} of {len(targets[model])} target images", file=sys.stderr)
        found = pool.map(_far_rows, TargetJob(kept), ["uid", *COLUMNS])
        return Removals.of([u for f in found for u in f[1]], REASON, rows=[r for f in found for r in f[0]])


def _embedded_targets(table: pa.Table) -> dict[str, np.ndarray]:
    """Per scoring model, the target images' unit embeddings."""
    if "image_embedding" not in table.column_names:
        raise CurateError("target: the target images have no embeddings; the pipeline needs a score stage with "
                          "store_embeddings before the target stage")
    table = table.filter(pc.and_(pc.is_valid(table.column("image_embedding")), pc.is_valid(table.column("clip_model"))))
    models = table.column("clip_model").to_pylist()
    return {model: unit_rows(table.filter(pc.equal(table.column("clip_model"), model)).column("image_embedding"))
            for model in sorted(set(models))}


def _nearest(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Each unit vector's nearest centroid (faiss inner product: no rows × clusters matrix in memory)."""
    import faiss

    if len(centroids) < 2 or not len(vectors):
        return np.zeros(len(vectors), np.int64)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)[1].ravel().astype(np.int64)


def _top_clusters(votes: np.ndarray, share: float) -> np.ndarray:
    """The fewest clusters, most votes first (ties by index), holding ``share`` of the votes; never one without."""
    order = np.lexsort((np.arange(len(votes)), -votes))
    order = order[votes[order] > 0]
    held = np.cumsum(votes[order]) / max(1, votes.sum())
    return np.sort(order[: int(np.searchsorted(held, share - 1e-9)) + 1])


@dataclass(frozen=True)
class TargetJob:
    """Per scoring model, the pool's centroids and the clusters kept."""

    kept: dict[str, tuple[np.ndarray, np.ndarray]]


def _far_rows(job: TargetJob, table: pa.Table) -> tuple[list[int], list[str]]:
    """Map: (rows, uids) of the embedded rows whose nearest centroid is not a kept cluster."""
    table = table.filter(pc.and_(pc.is_valid(table.column("image_embedding")), pc.is_valid(table.column("clip_model"))))
    rows, uids = [], []
    for model, (centroids, clusters) in job.kept.items():
        chosen = table.filter(pc.equal(table.column("clip_model"), model))
        if not chosen.num_rows:
            continue
        far = ~np.isin(_nearest(centroids, unit_rows(chosen.column("image_embedding"))), clusters)
        rows += np.asarray(chosen.column("row"))[far].tolist()
        uids += np.asarray(chosen.column("uid").to_pylist(), dtype=object)[far].tolist()
    return rows, uids
