"""The alignment filter: a decision over stored CLIP scores, cheap to redo with another threshold.

``min_score`` keeps rows whose score reaches an absolute cosine; ``keep_top`` keeps the best fraction of the pool,
ranked within each scoring model (the ``clip_model`` column). Ranking per model matters: cosines of different models
are on different scales, and a bootstrapped score (one model per fold) is only comparable inside its fold.

``relative: true`` ranks by how much better a caption fits its own image than it fits the pool's other images, and
the image its caption than the pool's other captions: the cosine minus the mean of the two rows' cosines to their
``neighbours`` nearest counterparts in a reference sample of the pool (CSLS, the hubness correction of
cross-lingual retrieval). A caption common in the pool ("flag", a boilerplate line) sits near many images and a blank
image near many captions; raw cosines reward both for being common, relative ones do not. It reads the stored
embeddings in tasks (curate.core.pool): the driver holds the reference sample and one score per row.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.core.pool import Pool
from curate.core.stage import GlobalStage, Removals
from curate.config import StageConfig

BELOW_MIN, BELOW_TOP = "alignment:below_min_score", "alignment:below_top_fraction"


class AlignmentConfig(StageConfig):
    stage: Literal["alignment"] = "alignment"
    column: str = Field("clip_score", description="the score column to filter on (clip_score or itm_score)")
    min_score: float | None = Field(None, ge=-1, le=1, description="keep rows whose score is at least this cosine")
    keep_top: float | None = Field(
        None, gt=0, le=1, description="keep this fraction of the live rows with the highest scores, per model "
        "(e.g. 0.3 for DataComp's CLIP top-30%)")
    relative: bool = Field(False, description="rank by the score relative to the pool (CSLS: the cosine minus the "
                           "rows' mean cosine to their nearest counterparts in a reference sample), so a caption or "
                           "image is not rewarded for being common; needs the score stage's stored embeddings")
    reference_rows: int = Field(4096, ge=16, description="rows per scoring model in the reference sample (chosen "
                                "by a hash of the uid, the same on every rerun)")
    neighbours: int = Field(10, ge=1, description="nearest reference counterparts a row's correction averages over")

    @model_validator(mode="after")
    def _one_rule(self) -> AlignmentConfig:
        if (self.min_score is None) == (self.keep_top is None):
            raise ValueError("give exactly one of min_score (an absolute cosine) or keep_top (a fraction of the pool)")
        if self.relative and self.column != "clip_score":
            raise ValueError(f"relative: true ranks clip_score against the stored embeddings, not {self.column}: "
                             "set column: clip_score or relative: false")
        if self.relative and self.min_score is not None:
            raise ValueError("relative scores are not on the cosine's scale, so min_score means nothing for them: "
                             "use keep_top with relative: true")
        return self


class AlignmentFilter(GlobalStage[AlignmentConfig]):
    name = "alignment"
    Config = AlignmentConfig
    counts_would_reject = True

    def inputs(self) -> list[str]:
        config: AlignmentConfig = self.config
        return [config.column, "clip_model"] + (["image_embedding", "text_embedding"] if config.relative else [])

    def decide_pool(self, pool: Pool) -> Removals:
        """In tasks over the pool: the driver holds one float per live row while it finds each model's cut (keep_top),
        then receives only the removed rows and the few tied at a cut; never the live rows' uids."""
        config: AlignmentConfig = self.config
        if config.relative:
            scored = relative_scores(pool, config.reference_rows, config.neighbours)
            removed = self.decide(scored.rename_columns(["row", "uid", "clip_model", config.column]))
            return removed.with_rows(dict(zip(scored.column("uid").to_pylist(), scored.column("row").to_pylist())),
                                     self.name)
        columns = [config.column, "clip_model"]
        if config.min_score is not None:
            cuts = {None: (config.min_score, 0)}  # below min_score, whatever the model; no rows tied to rank
            pieces = pool.map(_below_cut, (config.column, cuts, False), columns)
            return _removals([below for below, _ in pieces], BELOW_MIN)
        by_model: dict[str | None, list[np.ndarray]] = {}
        for scores in pool.map(_scores_by_model, config.column, columns):
            for model, values in scores.items():
                by_model.setdefault(model, []).append(values)
        cuts = {}
        for model, chunks in by_model.items():
            scores = np.concatenate(chunks)
            keep = math.ceil(config.keep_top * len(scores))  # type: ignore[operator]
            if keep >= len(scores):
                continue
            cut = np.partition(scores, len(scores) - keep)[len(scores) - keep] if keep else np.inf
            cuts[model] = (cut, keep - int((scores > cut).sum()))  # rows at the cut that are still kept
            del scores
        pieces = pool.map(_below_cut, (config.column, cuts, True), columns)
        return _removals([below for below, _ in pieces] + [_rank_ties(pieces, cuts)], BELOW_TOP)

    def decide(self, metadata: pa.Table) -> Removals:
        config: AlignmentConfig = self.config
        uids = np.asarray(metadata.column("uid").to_pylist(), dtype=object)
        scores = metadata.column(config.column).to_numpy(zero_copy_only=False).astype(np.float64)
        scores = np.where(np.isnan(scores), -np.inf, scores)  # a row without a score never ranks above one with it
        if config.min_score is not None:
            removed, reason = scores < config.min_score, BELOW_MIN
        else:
            removed, reason = self.outside_top(uids, scores, metadata.column("clip_model").to_pylist(),
                                                config.keep_top), BELOW_TOP  # type: ignore[arg-type]
        return Removals.of(uids[removed].tolist(), reason)

    @staticmethod
    def outside_top(uids: np.ndarray, scores: np.ndarray, models: list[str | None], fraction: float) -> np.ndarray:
        """Per model, all but the ceil(fraction × n) best rows; equal scores are ranked by uid so the cut is
        the same whatever order the rows come in."""
        removed = np.zeros(len(uids), dtype=bool)
        by_model: dict[str | None, list[int]] = {}
        for i, model in enumerate(models):
            by_model.setdefault(model, []).append(i)
        for rows in by_model.values():
            index = np.asarray(rows)
            order = index[np.lexsort((uids[index], -scores[index]))]
            removed[order[math.ceil(fraction * len(index)):]] = True
        return removed


def _scores(table: pa.Table, column: str) -> np.ndarray:
    scores = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)  # a row without a score never ranks above one with it


def _models(table: pa.Table) -> tuple[list[str | None], np.ndarray]:
    """The distinct ``clip_model`` values of a group and each row's index into them."""
    encoded = table.column("clip_model").combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    if encoded.null_count:
        names.append(None)
        codes = np.where(encoded.is_null().to_numpy(zero_copy_only=False), len(names) - 1, codes)
    return names, codes.astype(np.int64)


def _scores_by_model(column: str, table: pa.Table) -> dict[str | None, np.ndarray]:
    """A map task: the group's scores (no score: -inf), per scoring model; float32 when stored so (exact, and half
    the driver's memory)."""
    scores = _scores(table, column)
    if table.schema.field(column).type == pa.float32():
        scores = scores.astype(np.float32)
    names, codes = _models(table)
    return {name: scores[codes == i] for i, name in enumerate(names)}


def _below_cut(job: tuple, table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A map task: (rows below their model's cut: uid, row; rows exactly at it: uid, row, clip_model) of a group.
    ``job``: the score column, model -> (cut, rows at the cut still kept), and whether cuts are per model."""
    column, cuts, per_model = job
    scores = _scores(table, column)
    below, at = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    names, codes = _models(table)
    for i, name in enumerate(names):
        key = name if per_model else None
        if key not in cuts:
            continue
        cut, _ = cuts[key]
        mine = codes == i if per_model else np.ones(len(scores), bool)
        below |= mine & (scores < cut)
        if per_model:
            at |= mine & (scores == cut)
    pick = ["uid", "row"]
    return (table.select(pick).filter(pa.array(below)),
            table.select([*pick, "clip_model"]).filter(pa.array(at)))


def _rank_ties(pieces: list[tuple[pa.Table, pa.Table]], cuts: dict) -> pa.Table:
    """Of the rows at a model's cut, all but the first ones by uid (as many as the cut still keeps): removed."""
    tied = pa.concat_tables([at for _, at in pieces]) if pieces else None
    if tied is None or not tied.num_rows:
        return _NO_ROWS
    out = []
    models = tied.column("clip_model").to_pylist()
    uids = np.asarray(tied.column("uid").to_pylist(), dtype=object)
    for model in dict.fromkeys(models):
        index = np.flatnonzero(np.asarray([m == model for m in models]))
        order = index[np.argsort(uids[index], kind="stable")]
        out.append(order[cuts[model][1]:])
    lose = np.sort(np.concatenate(out)) if out else np.array([], np.int64)
    return tied.select(["uid", "row"]).take(pa.array(lose, pa.int64()))


def _removals(tables: list[pa.Table], reason: str) -> Removals:
    """Removals of the rows (uid, row) in ``tables``, all for ``reason``."""
    removed = pa.concat_tables(tables) if tables else _NO_ROWS
    return Removals.of(removed.column("uid").to_pylist(), reason, rows=removed.column("row").to_numpy())


_NO_ROWS = pa.table({"uid": pa.array([], pa.string()), "row": pa.array([], pa.int64())})


HUB_WEIGHT = 0.5


def _uid_draw(uids: list[str]) -> np.ndarray:
    """A number in [0, 1) per uid (uids are hex digests), independent of the bootstrap folds' and the experiment's
    digits: which rows join the reference sample."""
    return np.array([int(u[20:28], 16) / 16**8 if len(u) >= 28 else 0.5 for u in uids])


def _vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = len(values[0]) if len(values) else 0
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(values), width) if width else np.zeros((len(values), 0), np.float32)


def _sample(share: float, table: pa.Table) -> pa.Table:
    picked = _uid_draw(table.column("uid").to_pylist()) < share
    return table.filter(pa.array(picked & np.asarray(table.column("image_embedding").is_valid())))


def _relative(reference: dict, table: pa.Table) -> pa.Table:
    """CSLS per row: 2 cos(i, t) − mean of t's k best cosines to reference images − mean of i's to reference
    captions (halved, to stay on the cosine's scale); rows of a model without a reference keep their cosine."""
    k = reference["neighbours"]
    models = table.column("clip_model").to_pylist()
    scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64).copy()
    valid = np.asarray(table.column("image_embedding").is_valid()) & np.asarray(table.column("text_embedding").is_valid())
    for model in set(models):
        rows = np.flatnonzero((np.asarray(models, dtype=object) == model) & valid)
        if model not in reference["models"] or not len(rows):
            continue
        ref_image, ref_text, ref_uids = reference["models"][model]
        image = _vectors(table.column("image_embedding").take(pa.array(rows)))
        text = _vectors(table.column("text_embedding").take(pa.array(rows)))
        own = np.einsum("ij,ij->i", image, text)
        uids = np.asarray(table.column("uid").to_pylist(), dtype=object)[rows]
        self_at = {u: j for j, u in enumerate(ref_uids)}
        in_reference = np.array([self_at.get(u, -1) for u in uids], dtype=np.int64)
        depth = min(k, len(ref_uids))
        hubs = _hubness(text, ref_image, in_reference, depth) + _hubness(image, ref_text, in_reference, depth)
        scores[rows] = own - HUB_WEIGHT * hubs
    return pa.table({"row": table.column("row"), "uid": table.column("uid"), "clip_model": table.column("clip_model"),
                     "score": pa.array(scores, pa.float64())})


HUB_CHUNK = 4096  # rows compared with the reference at once: 4096 × 4096 float32 cosines, 64 MB


def _hubness(vectors: np.ndarray, reference: np.ndarray, in_reference: np.ndarray, depth: int) -> np.ndarray:
    """Each row's mean cosine to its ``depth`` nearest reference vectors, its own entry (``in_reference``, -1: none)
    left out; 0 when nothing is left."""
    hubs = np.zeros(len(vectors))
    for start in range(0, len(vectors), HUB_CHUNK):
        cosines = vectors[start:start + HUB_CHUNK] @ reference.T
        own = in_reference[start:start + HUB_CHUNK]
        listed = np.flatnonzero(own >= 0)
        cosines[listed, own[listed]] = -np.inf  # a reference row is not its own counterpart
        best = np.partition(cosines, cosines.shape[1] - depth, axis=1)[:, -depth:]
        counted = np.isfinite(best).sum(axis=1)
        total = np.where(np.isfinite(best), best, 0.0).sum(axis=1)
        hubs[start:start + HUB_CHUNK] = np.where(counted > 0, total / np.maximum(counted, 1), 0.0)
    return hubs


def relative_scores(pool: Pool, reference_rows: int, neighbours: int) -> pa.Table:
    """row, uid, clip_model and the CSLS score of every live row; the reference sample per model is drawn by uid."""
    columns = ["image_embedding", "text_embedding", "clip_model", "clip_score"]
    share = min(1.0, 24 * reference_rows / max(1, pool.rows))  # enough for up to ~24 scoring models (folds)
    sampled = [t for t in pool.map(_sample, share, columns) if t.num_rows]
    models: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    if sampled:
        sample = pa.concat_tables(sampled)
        draw = _uid_draw(sample.column("uid").to_pylist())
        names = sample.column("clip_model").to_pylist()
        for model in sorted(set(n for n in names if n is not None)):
            rows = np.flatnonzero(np.asarray(names, dtype=object) == model)
            rows = rows[np.argsort(draw[rows], kind="stable")][:reference_rows]
            picked = sample.take(pa.array(rows))
            models[model] = (_vectors(picked.column("image_embedding")), _vectors(picked.column("text_embedding")),
                             picked.column("uid").to_pylist())
    pieces = pool.map(_relative, {"models": models, "neighbours": neighbours}, columns)
    if not pieces:
        return pa.table({"row": pa.array([], pa.int64()), "uid": pa.array([], pa.string()),
                         "clip_model": pa.array([], pa.string()), "score": pa.array([], pa.float64())})
    return pa.concat_tables(pieces)
