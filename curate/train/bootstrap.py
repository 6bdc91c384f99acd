"""``score.model: bootstrap`` — CLIP scores and embeddings without any pretrained model, by K-fold cross-fitting.

When no pretrained model suits the domain (or none can be downloaded), the pool trains its own scorers: its rows are
split into K folds by uid, a small CLIP is trained on every K-1 folds, and each fold is scored by the model that
never saw it (so a model cannot vouch for pairs it memorised). The scores, model names and embeddings land in the
stored parts exactly as the pretrained path writes them, before any decision, so everything downstream is the same.

The runner calls ``bootstrap_scores`` after the per-sample stream has stored every row. On Ray the heavy work runs
in tasks, not in the driver: the fold tars written from the stored parts in groups, one training task per fold
(on a GPU when the score stage asks for one), and the scoring of the stored parts in groups (each round's, with
``bootstrap.rounds > 1``). Each step resumes: fold shards are rewritten only if missing, training
resumes from its checkpoints, scored parts are skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core import parts as part_store
from curate.core.atomic import atomic_file
from curate.sinks.pair_tars import write_pair_tars
from curate.core.stage import OK, Stage
from curate.stages.score import ScoreConfig, ScoreStage
from curate.core.fan_out import fan_out, task_count
from curate.core.worker import StageWorker

if TYPE_CHECKING:
    from curate.train.config import TrainConfig

FOLDER = "bootstrap"


def fold_of(uid: str, folds: int) -> int:
    return int(uid[:12], 16) % folds  # uids are hex digests: a stable, even split


def _scored(path: Path) -> bool:
    return "clip_score" in pq.ParquetFile(path).schema_arrow.names


def round_folder(out: Path, round_: int) -> Path:
    return Path(out) / FOLDER if round_ == 1 else Path(out) / FOLDER / f"round_{round_}"


def write_fold_shards(out: Path, folds: int, folder: Path, trusted: set[str] | None = None) -> list[list[Path]]:
    """Per fold, tars with the stored image and caption of its live rows (its ``trusted`` ones, in later rounds):
    one tar per fold and group of parts, each group written by a task on Ray; written once."""
    parts = part_store.part_files(out)
    count = task_count(len(parts))
    groups = [(g, [str(p) for p in parts[g::count]]) for g in range(count) if parts[g::count]]
    wanted = pa.array(sorted(trusted), pa.string()) if trusted is not None else None
    fan_out(_write_fold_group, (str(folder), folds, len(groups), wanted), groups, cpus_per_task=0.5)
    return [[_fold_tar(folder, k, g, len(groups)) for g, _ in groups] for k in range(folds)]


def _fold_tar(folder: Path, fold: int, group: int, groups: int) -> Path:
    # the group count in the name: a resume cut into other groups never takes an earlier cut's tars for its own
    return Path(folder) / f"fold_{fold}-{group:05d}-of-{groups:05d}.tar"


def _write_fold_group(shared: tuple[str, int, int, pa.Array | None], group: tuple[int, list[str]]) -> int:
    """One group of parts into its tar of each fold (a task on Ray)."""
    folder, folds, groups, wanted = shared
    index, paths = group

    def where(table: pa.Table) -> pa.Array:
        live = pc.equal(table.column("status"), OK)
        return live if wanted is None else pc.and_(live, pc.is_in(table.column("uid"), value_set=wanted))

    tars = [_fold_tar(Path(folder), k, index, groups) for k in range(folds)]
    write_pair_tars([Path(p) for p in paths], tars, lambda uid: (fold_of(uid, folds),), where)
    return index


def train_fold_models(folder: Path, config: ScoreConfig, shards: list[list[Path]], batch_size: int,
                      progress: bool, training_rows: int) -> list[Path]:
    """Model k trained on every fold but k (about ``training_rows`` rows), each as a Ray task on Ray (a GPU each
    when the score stage asks for GPUs), else one after the other here; returns their checkpoint folders."""
    from curate.train.config import TrainConfig

    boot = config.bootstrap
    steps = boot.steps_for(training_rows, batch_size)
    trainings = [TrainConfig(
        model=boot.architecture, objectives=["clip"],
        data=[str(tar) for i, tars in enumerate(shards) if i != k for tar in tars],
        output=str(folder / f"model_{k}"), steps=steps, batch_size=batch_size,
        lr=boot.lr, warmup_steps=min(20, steps // 10), seed=boot.seed + k, log_every=max(1, steps // 5),
        drop_noisiest=boot.drop_noisiest, checkpoint_every=steps, keep_checkpoints=1,
        device="cuda" if config.resources.gpus else "cpu") for k in range(len(shards))]
    if progress:
        print(f"[bootstrap] training {len(shards)} scorers, each on the other folds ({folder.name})", file=sys.stderr)
    return [Path(p) for p in fan_out(train_in_task, progress, trainings, cpus_per_task=config.resources.cpus,
                                     gpus_per_task=config.resources.gpus)]


def train_in_task(progress: bool, config: TrainConfig) -> str:
    """One fold's scorer (a task on Ray): its checkpoint folder. A GPU when asked for and present (a driver
    without one, in a run off Ray, trains on its CPUs)."""
    import torch

    from curate.train.loop import train

    if config.device == "cuda" and not torch.cuda.is_available():
        config = config.model_copy(update={"device": "cpu"})
    return str(train(config, progress=progress).checkpoint)


MIN_TRAINING_ROWS = 8  # fewer live rows per training set than this cannot train a contrastive scorer


class _ScoreByFold(Stage[ScoreConfig]):
    """The score stage with one model per fold: each row goes to the model that did not train on it. With no
    scorers (a pool too small to train on), every live row fails with score:pool_too_small."""

    name = "score"
    Config = ScoreConfig

    def __init__(self, config: ScoreConfig, scorers: list[ScoreStage]) -> None:
        super().__init__(config)
        self.scorers = scorers

    def inputs(self) -> list[str]:
        return ["image", "caption"]

    def setup(self) -> None:
        for scorer in self.scorers:
            scorer.setup()

    def outputs(self) -> dict[str, pa.DataType]:
        return self.scorers[0].outputs() if self.scorers else ScoreStage(self.config).outputs()

    def process(self, batch: pa.Table) -> pa.Table:
        if not self.scorers:
            from curate.core.stage import RowOutcomes

            outcomes = RowOutcomes(batch.num_rows, self.outputs())
            for i in range(batch.num_rows):
                outcomes.fail(i, "score:pool_too_small")
            return outcomes.apply(batch)
        return process_by_fold(batch, self.scorers)


def process_by_fold(batch: pa.Table, stages: list[Stage]) -> pa.Table:
    """Each row of ``batch`` through ``stages[k]``, k its fold (one stage per fold), back in the batch's order."""
    folds = pa.array([fold_of(uid, len(stages)) for uid in batch.column("uid").to_pylist()])
    pieces, order = [], []
    for k, stage in enumerate(stages):
        picked = pc.equal(folds, k)
        indices = pc.indices_nonzero(picked)
        if len(indices):
            pieces.append(stage.process(batch.filter(picked)))
            order.append(indices)
    merged = pa.concat_tables(pieces, promote_options="permissive")
    return merged.take(pc.sort_indices(pa.concat_arrays(order)))


def trusted_rows(scores: pa.Table, keep_top: float) -> set[str]:
    """The uids a round ranked in the top ``keep_top`` of their fold (one model per fold: ranks stay on one scale)."""
    from curate.stages.alignment import AlignmentFilter

    uids = scores.column("uid").to_numpy(zero_copy_only=False).astype(object)
    values = scores.column("clip_score").to_numpy(zero_copy_only=False).astype("float64")
    removed = AlignmentFilter.outside_top(uids, values, scores.column("clip_model").to_pylist(), keep_top)
    return set(uids[~removed].tolist())


def _round_scores(out: Path, scorers: FoldScorers, folder: Path) -> pa.Table:
    """uid, clip_score, clip_model of every live row under one round's models (kept in the round's folder); the
    parts are scored in groups, as tasks on Ray."""
    path = folder / "scores.parquet"
    if not path.exists():
        parts = [str(p) for p in part_store.part_files(out)]
        count = task_count(len(parts))
        groups = [parts[i::count] for i in range(count) if parts[i::count]]
        config = scorers.config
        pieces = fan_out(_live_scores, scorers, groups, cpus_per_task=config.resources.cpus,
                         gpus_per_task=config.resources.gpus)
        with atomic_file(path) as handle:
            pq.write_table(pa.concat_tables(pieces), handle)
    return pq.read_table(path)


def _live_scores(scorers: FoldScorers, paths: list[str]) -> pa.Table:
    """uid, clip_score, clip_model of the live rows of these parts (a task on Ray)."""
    worker, pieces = scorers.worker(), []
    for path in paths:
        table = pq.read_table(path)
        scored = worker(table.filter(pc.equal(table.column("status"), OK)))
        pieces.append(scored.filter(pc.equal(scored.column("status"), OK)).select(["uid", "clip_score", "clip_model"]))
    return pa.concat_tables(pieces)


@dataclass(frozen=True)
class FoldScorers:
    """One round's scorers: the score stage's config and the checkpoint folder of each fold's model (none when
    the pool was too small to train on). Small and picklable: what a scoring task is sent."""

    config: ScoreConfig
    models: list[str]

    def worker(self) -> StageWorker:
        """The score stage with one model per fold, set up before its first batch."""
        return StageWorker(_ScoreByFold(self.config, [ScoreStage(self.config.model_copy(update={"model": model}))
                                                      for model in self.models]))


def _score_parts(scorers: FoldScorers, paths: list[str]) -> int:
    """Score these stored parts with the fold models (a task on Ray) and store them again: the same rows under the
    same name, now with the score stage's columns."""
    worker = scorers.worker()
    for path in paths:
        part_store.write_part(worker(pq.read_table(path)), str(Path(path).parent))
    return len(paths)


def bootstrap_scores(out: Path, stage: ScoreStage, progress: bool = True) -> None:
    """Score every stored live row with cross-fitted models, adding the score stage's columns to the parts.

    With ``bootstrap.rounds > 1``, BLIP's bootstrapping (DFN's filter networks): each further round trains its fold
    models only on the rows the previous round trusted (its top ``keep_top`` per fold), and the last round's models
    score the pool. A fold is still never scored by a model that trained on it."""
    out = Path(out)
    parts = part_store.part_files(out)
    if all(_scored(p) for p in parts):
        return
    config: ScoreConfig = stage.config
    boot = config.bootstrap
    live = sum(pc.sum(pc.equal(pq.read_table(p, columns=["status"]).column("status"), OK)).as_py() or 0
               for p in parts)
    scorers = FoldScorers(config, [])
    trusted: set[str] | None = None
    for round_ in range(1, boot.rounds + 1):
        training_rows = (live if trusted is None else len(trusted)) * (boot.folds - 1) // boot.folds
        if training_rows < MIN_TRAINING_ROWS:
            if progress:
                print(f"[bootstrap] {training_rows} rows are too few to train round {round_}'s scorers on"
                      + ("; the live rows fail as score:pool_too_small" if round_ == 1 else
                         f"; round {round_ - 1}'s scores stand"), file=sys.stderr)
            break
        folder = round_folder(out, round_)
        shards = write_fold_shards(out, boot.folds, folder, trusted)
        models = train_fold_models(folder, config, shards, min(boot.batch_size, training_rows), progress,
                                   training_rows)
        scorers = FoldScorers(config, [str(model) for model in models])
        if round_ < boot.rounds:
            trusted = trusted_rows(_round_scores(out, scorers, folder), boot.keep_top)
    pending = [str(p) for p in parts if not _scored(p)]
    count = task_count(len(pending))
    groups = [pending[i::count] for i in range(count) if pending[i::count]]
    fan_out(_score_parts, scorers, groups, cpus_per_task=config.resources.cpus, gpus_per_task=config.resources.gpus)
    if progress:
        print(f"[bootstrap] scored {len(parts)} parts with {len(scorers.models)} cross-fitted models",
              file=sys.stderr)
