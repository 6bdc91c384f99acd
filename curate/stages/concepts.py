"""Concept filters: zero-shot similarity of the stored image embeddings to text prompts ("a watermark", "a
screenshot of text", anything a user names), with the model that made the embeddings. A row whose cosine to any of
a concept's prompts reaches ``threshold`` is filtered with ``concept:<name>`` (the first concept in order wins).

No image is read and no image is embedded again: only the prompts are encoded, once per scoring model, in the
driver; the cosines are computed in tasks beside the stored embeddings, which never travel to the driver.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.core.stage import GlobalStage, Removals, Stage
from curate.config import StageConfig

if TYPE_CHECKING:
    from curate.core.pool import Pool


class ConceptsConfig(StageConfig):
    stage: Literal["concepts"] = "concepts"
    concepts: dict[str, list[str]] = Field(description="concept name → prompts, e.g. watermark: [a watermark, a "
                                           "photo with a watermark]; a single string is one prompt")
    threshold: float = Field(0.25, gt=-1, le=1, description="image-prompt cosine at which a row shows the concept "
                             "(CLIP ViT-B-32 puts matching pairs around 0.25-0.35)")

    @field_validator("concepts", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("concepts")
    @classmethod
    def _named(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("name at least one concept with its prompts")
        for name, prompts in value.items():
            if not name.replace("_", "").isalnum() or not prompts:
                raise ValueError(f"concept '{name}': a name of letters, digits and _ with at least one prompt")
        return value


class ConceptFilter(GlobalStage[ConceptsConfig]):
    name = "concepts"
    Config = ConceptsConfig
    counts_would_reject: ClassVar[bool] = True
    fans_out: ClassVar[bool] = True  # cosines in tasks beside the embeddings

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.score_spec: ClipSpec | None = None
        self._prompts: dict[str, dict[str, np.ndarray]] = {}  # per model: the stage decides twice (would_reject)

    def inputs(self) -> list[str]:
        return ["image_embedding", "clip_model"]

    def bind(self, stages: list[Stage]) -> None:
        score = next((s for s in stages if s.name == "score"), None)
        if score is not None and not score.deferred:
            self.score_spec = score.config.spec()  # type: ignore[attr-defined]

    def _spec_for(self, described: str) -> ClipSpec:
        """The model behind a stored ``clip_model``: the pipeline's score stage, or a checkpoint the name points at
        (bootstrapped scorers)."""
        if self.score_spec is not None and self.score_spec.describe() == described:
            return self.score_spec
        spec = ClipSpec(described)  # local-dir:, hf-hub:, transformers:/path name their model in full
        if described.startswith(("local-dir:", "hf-hub:")) or spec.family != "open_clip":
            return spec
        raise CurateError(f"concepts: rows were scored with {described}, which this pipeline's score stage does not "
                          "name; score and filter with the same pipeline")

    def prompt_embeddings(self, described: str) -> dict[str, np.ndarray]:
        """Concept → (prompts, d) unit vectors from the model that embedded the images (loaded once per model)."""
        if described in self._prompts:
            return self._prompts[described]
        from curate.models.scorer import load_scorer

        config: ConceptsConfig = self.config
        scorer = load_scorer(self._spec_for(described), "cpu")
        out = {name: scorer.embed_texts(prompts) for name, prompts in config.concepts.items()}
        print(f"[concepts] {len(out)} concepts encoded with {described}", file=sys.stderr)
        self._prompts[described] = out
        return out

    def decide_pool(self, pool: Pool) -> Removals:
        """The prompts are encoded here, once per scoring model; the cosines are computed in tasks beside the
        stored embeddings (curate.core.pool), which send back only the rows they remove and their counts."""
        config: ConceptsConfig = self.config
        models = sorted(set().union(*pool.map(_models_present, None, ["clip_model"])))
        job = ConceptJob(list(config.concepts), {m: self.prompt_embeddings(m) for m in models}, config.threshold)
        found = pool.map(_concept_matches, job, self.inputs())
        would_reject = {f"concept:{name}": sum(f[3].get(name, 0) for f in found) for name in config.concepts}
        return Removals.of([u for f in found for u in f[1]], [r for f in found for r in f[2]],
                           rows=[r for f in found for r in f[0]], would_reject=would_reject)


def _models_present(_job: None, table: pa.Table) -> set[str]:
    return {m for m in table.column("clip_model").to_pylist() if m}


@dataclass(frozen=True)
class ConceptJob:
    """What a concept task needs: the concepts in order, each scoring model's prompt vectors, the threshold."""

    concepts: list[str]
    prompts: dict[str, dict[str, np.ndarray]]
    threshold: float


def _concept_matches(job: ConceptJob, table: pa.Table) -> tuple[list[int], list[str], list[str], dict[str, int]]:
    """Map: (rows, uids, reasons) of the rows that show a concept (the first concept in order wins), and per
    concept every row that shows it (what it would reject on its own)."""
    from curate.dedup.semantic import unit_rows

    reasons = np.full(table.num_rows, None, dtype=object)
    shown = dict.fromkeys(job.concepts, 0)
    embedded = pc.is_valid(table.column("image_embedding")).to_numpy(zero_copy_only=False)
    models = np.asarray(table.column("clip_model").to_pylist(), dtype=object)
    for described, prompts in job.prompts.items():
        rows = np.flatnonzero(embedded & (models == described))
        if not len(rows):
            continue
        images = unit_rows(table.column("image_embedding").take(rows))
        for name in job.concepts:
            shows = (images @ prompts[name].T).max(axis=1) >= job.threshold
            shown[name] += int(shows.sum())
            undecided = reasons[rows] == None  # noqa: E711 (elementwise)
            reasons[rows[shows & undecided]] = f"concept:{name}"
    removed = np.flatnonzero(reasons != None)  # noqa: E711
    return (table.column("row").to_numpy()[removed].tolist(),
            np.asarray(table.column("uid").to_pylist(), dtype=object)[removed].tolist(), reasons[removed].tolist(),
            shown)
