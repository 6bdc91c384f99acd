"""``caption.model: bootstrap`` — BLIP's CapFilt on a pool with no pretrained captioner: CoCas trained on the pool.

After the bootstrapped score stage has scored every stored row (curate.train.bootstrap), the pairs its scores trust
most (the top ``trust_top`` of each fold) train one small CoCa per fold on the other folds' trusted rows, as the
scorers were trained. Each fold's rows are then put through the caption stage with their fold's CoCa and their
fold's scorer: a row is never captioned, nor rescored, by a model that trained on it. In ``rescue`` mode a fold's
rows below its cut (outside the top ``rescue_outside_top`` of the fold's scores, or under ``rescue_below``) get a
synthetic caption, scored by the fold's scorer against the stored image embedding, and keep whichever caption
scores higher; the alignment filter decides on that score.

Each step resumes: the captioners' fold tars are written once, training resumes from its checkpoints, captioned parts
are skipped. On Ray the trainings (a GPU each when the caption stage asks for one) and the captioning of the stored
parts run as tasks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import parts as part_store
from curate.core.fan_out import fan_out, task_count
from curate.core.stage import OK, RowOutcomes, Stage
from curate.core.worker import StageWorker
from curate.stages.caption import RAW, SCORED_MODES, CaptionConfig, CaptionStage, ScorerSpec
from curate.stages.score import ScoreConfig
from curate.train.bootstrap import (FOLDER, MIN_TRAINING_ROWS, fold_of, process_by_fold, train_in_task,
                                    trusted_rows, write_fold_shards)

CAPTIONERS = "captioners"  # OUT/bootstrap/captioners: the fold tars and CoCa checkpoints


def _captioned(path: Path) -> bool:
    return "caption_source" in pq.ParquetFile(path).schema_arrow.names


def live_scores(out: Path) -> pa.Table:
    """uid, clip_score, clip_model of every stored live row: the bootstrapped scores of the raw captions (a part
    captioned before a resume holds them as raw_clip_score), so a resumed run ranks and cuts as the first did."""
    pieces = []
    for path in part_store.part_files(out):
        raw = "raw_clip_score" in pq.ParquetFile(path).schema_arrow.names
        table = pq.read_table(path, columns=["uid", "status", "clip_score", "clip_model"]
                              + (["raw_clip_score"] if raw else []))
        if raw:
            table = table.set_column(table.column_names.index("clip_score"), "clip_score",
                                     pc.coalesce(table.column("raw_clip_score"), table.column("clip_score")))
            table = table.drop_columns(["raw_clip_score"])
        pieces.append(table.filter(pc.and_(pc.equal(table.column("status"), OK),
                                           pc.is_valid(table.column("clip_score")))).drop_columns(["status"]))
    return pa.concat_tables(pieces) if pieces else pa.table({"uid": pa.array([], pa.string()),
                                                             "clip_score": pa.array([], pa.float32()),
                                                             "clip_model": pa.array([], pa.string())})


def fold_cuts(scores: pa.Table, keep_top: float) -> dict[str, float]:
    """Per scoring model (one per fold), the lowest score its top ``keep_top`` holds: rows below it are rescued."""
    trusted = trusted_rows(scores, keep_top)
    uids = scores.column("uid").to_pylist()
    values = scores.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    cuts: dict[str, float] = {}
    for uid, value, model in zip(uids, values, scores.column("clip_model").to_pylist()):
        if uid in trusted:
            cuts[model] = min(cuts.get(model, 1.0), float(value))
    return cuts


@dataclass(frozen=True)
class FoldCaptioners:
    """What a captioning task is sent: the caption stage's config and, per fold, its CoCa checkpoint, its scorer
    (the clip_model its rows were scored with) and its rescue cut. No captioners: the pool was too small."""

    config: CaptionConfig
    folds: int
    captioners: list[str]
    scorers: list[str | None]
    cuts: list[float | None]

    def stage(self, fold: int) -> CaptionStage:
        """Fold ``fold``'s caption stage: its CoCa, its scorer, its cut (the config was validated as a whole)."""
        update: dict = {"model": self.captioners[fold]}
        if self.config.mode in SCORED_MODES:
            scorer = self.scorers[fold] or next(s for s in self.scorers if s)  # a fold without rows scores nothing
            update["scorer"] = ScorerSpec(model=scorer)
        if self.config.mode == "rescue":
            update |= {"rescue_below": self.cuts[fold], "rescue_outside_top": None}
        return CaptionStage(self.config.model_copy(update=update))

    def worker(self) -> StageWorker:
        return StageWorker(_CaptionByFold(self))


class _CaptionByFold(Stage[CaptionConfig]):
    """The caption stage with one CoCa and one scorer per fold: each row goes to the models that never trained on
    it. Without captioners every row keeps its raw caption (its provenance columns filled, nothing synthetic)."""

    name = "caption"
    Config = CaptionConfig

    def __init__(self, captioners: FoldCaptioners) -> None:
        super().__init__(captioners.config)
        self.captioners = captioners
        self.stages = [captioners.stage(k) for k in range(len(captioners.captioners))]

    def inputs(self) -> list[str]:
        return CaptionStage(self.config).inputs()

    def outputs(self) -> dict[str, pa.DataType]:
        return CaptionStage(self.config).outputs()

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process(self, batch: pa.Table) -> pa.Table:
        if not self.stages:
            return self._raw(batch)
        return process_by_fold(batch, self.stages)  # one stage per fold of the score stage

    def _raw(self, batch: pa.Table) -> pa.Table:
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        scored = self.config.mode in SCORED_MODES
        scores = batch.column("clip_score").to_pylist() if scored else [None] * batch.num_rows
        for i, caption in enumerate(batch.column("caption").to_pylist()):
            outcomes.set(i, "caption", caption)
            outcomes.set(i, "original_caption", caption)
            outcomes.set(i, "caption_source", RAW)
            if scored:
                outcomes.set(i, "raw_clip_score", scores[i])
                outcomes.set(i, "clip_score", scores[i])
        return outcomes.apply(batch)


def _caption_parts(captioners: FoldCaptioners, paths: list[str]) -> int:
    """Caption these stored parts (a task on Ray) and store them again, now with the caption stage's columns."""
    worker = captioners.worker()
    for path in paths:
        part_store.write_part(worker(pq.read_table(path)), str(Path(path).parent))
    return len(paths)


def train_captioners(folder: Path, config: CaptionConfig, shards: list[list[Path]], training_rows: int,
                     progress: bool) -> list[str]:
    """CoCa k trained on every fold's tars but k's, as Ray tasks on Ray; their checkpoint folders."""
    from curate.train.config import TrainConfig

    boot = config.bootstrap
    batch_size = min(boot.batch_size, training_rows)
    steps = boot.steps_for(training_rows, batch_size)
    trainings = [TrainConfig(
        model=boot.architecture, objectives=["coca"],
        data=[str(tar) for i, tars in enumerate(shards) if i != k for tar in tars],
        output=str(folder / f"model_{k}"), steps=steps, batch_size=batch_size, lr=boot.lr,
        warmup_steps=min(20, steps // 10), seed=boot.seed + k, log_every=max(1, steps // 5),
        checkpoint_every=steps, keep_checkpoints=1,
        device="cuda" if config.resources.gpus else "cpu") for k in range(len(shards))]
    if progress:
        print(f"[bootstrap] training {len(shards)} captioners, each on the other folds' trusted rows",
              file=sys.stderr)
    return fan_out(train_in_task, progress, trainings, cpus_per_task=config.resources.cpus,
                   gpus_per_task=config.resources.gpus)


def bootstrap_captions(out: Path, stage: CaptionStage, score: ScoreConfig, progress: bool = True) -> None:
    """Caption the stored pool with cross-fitted CoCas (after ``bootstrap_scores``), adding the caption stage's
    columns to the parts."""
    out = Path(out)
    parts = part_store.part_files(out)
    if all(_captioned(p) for p in parts):
        return
    config: CaptionConfig = stage.config
    folds = score.bootstrap.folds
    scores = live_scores(out)
    trusted = trusted_rows(scores, config.bootstrap.trust_top) if scores.num_rows else set()
    training_rows = len(trusted) * (folds - 1) // folds
    captioners: list[str] = []
    if training_rows >= MIN_TRAINING_ROWS:
        folder = out / FOLDER / CAPTIONERS
        shards = write_fold_shards(out, folds, folder, trusted)
        captioners = train_captioners(folder, config, shards, training_rows, progress)
    elif progress:
        print(f"[bootstrap] {training_rows} trusted rows are too few to train captioners on; every row keeps its "
              "raw caption", file=sys.stderr)
    model_of_fold: dict[int, str] = {}
    for uid, model in zip(scores.column("uid").to_pylist(), scores.column("clip_model").to_pylist()):
        model_of_fold.setdefault(fold_of(uid, folds), model)
    cut_of_model = fold_cuts(scores, config.rescue_outside_top) if config.rescue_outside_top is not None else {}
    scorers = [model_of_fold.get(k) for k in range(len(captioners))]
    cuts = [config.rescue_below if config.rescue_below is not None else cut_of_model.get(m, -1.0) for m in scorers]
    job = FoldCaptioners(config, folds, captioners, scorers, cuts)
    pending = [str(p) for p in parts if not _captioned(p)]
    count = task_count(len(pending))
    groups = [pending[i::count] for i in range(count) if pending[i::count]]
    fan_out(_caption_parts, job, groups, cpus_per_task=config.resources.cpus, gpus_per_task=config.resources.gpus)
    if progress:
        print(f"[bootstrap] captioned {len(parts)} parts with {len(captioners)} cross-fitted captioners",
              file=sys.stderr)
