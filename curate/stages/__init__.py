"""One file per stage. ``STAGES`` maps the names used in pipeline files to stage classes."""

from __future__ import annotations

from curate.core.stage import GlobalStage, Stage
from curate.stages.alignment import AlignmentFilter
from curate.stages.balance import BalanceFilter
from curate.stages.caption import CaptionStage
from curate.stages.concepts import ConceptFilter
from curate.stages.decontaminate import Decontaminate
from curate.stages.dedup_exact import DedupExact
from curate.stages.dedup_phash import DedupPhash
from curate.stages.dedup_semantic import DedupSemantic
from curate.stages.download.stage import DownloadStage
from curate.stages.hash import HashStage
from curate.stages.rules import RuleFilter
from curate.stages.score import ScoreStage
from curate.stages.target import TargetFilter

PER_SAMPLE = (DownloadStage, HashStage, ScoreStage, CaptionStage)
GLOBAL = (RuleFilter, AlignmentFilter, ConceptFilter, BalanceFilter, TargetFilter, DedupExact, DedupPhash,
          DedupSemantic, Decontaminate)
STAGES: dict[str, type[Stage] | type[GlobalStage]] = {stage.name: stage for stage in (*PER_SAMPLE, *GLOBAL)}
