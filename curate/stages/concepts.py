"""Concept filters: zero-shot similarity of the stored image embeddings to text prompts ("a watermark", "a
screenshot of text", anything a user names), with the model that made the embeddings. A row whose cosine to any of
a concept's prompts reaches ``threshold`` is filtered with ``concept:<name>`` (the first concept in order wins).

No image is read and no image is embedded again: only the prompts are encoded, once per scoring model.
"""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.core.stage import GlobalStage, Removals, Stage
from curate.config import StageConfig


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

    def __init__(self, config: StageConfig) -> None:
        super().__init__(config)
        self.score_spec: ClipSpec | None = None
        self._prompts: dict[str, dict[str, np.ndarray]] = {}  # per model: decide() runs twice (would_reject)

    def inputs(self) -> list[str]:
        return ["image_embedding", "clip_model"]

    def bind(self, stages: list[Stage]) -> None:
        score = next((s for s in stages if s.name == "score"), None)
        if score is not None and not score.deferred:
            cfg = score.config
            self.score_spec = ClipSpec(cfg.model, cfg.pretrained, cfg.architecture_file)  # type: ignore[attr-defined]

    def _spec_for(self, described: str) -> ClipSpec:
        """The model behind a stored ``clip_model``: the pipeline's score stage, or a checkpoint the name points at
        (bootstrapped scorers)."""
        if self.score_spec is not None and self.score_spec.describe() == described:
            return self.score_spec
        if described.startswith(("local-dir:", "hf-hub:")):
            return ClipSpec(described)
        raise CurateError(f"concepts: rows were scored with {described}, which this pipeline's score stage does not "
                          "name; score and filter with the same pipeline")

    def prompt_embeddings(self, described: str) -> dict[str, np.ndarray]:
        """Concept → (prompts, d) unit vectors from the model that embedded the images (loaded once per model)."""
        if described in self._prompts:
            return self._prompts[described]
        import torch

        from curate.models.clip import load_clip

        config: ConceptsConfig = self.config
        clip = load_clip(self._spec_for(described), "cpu")
        out = {}
        with torch.inference_mode():
            for name, prompts in config.concepts.items():
                out[name] = clip.model.encode_text(clip.tokenizer(prompts), normalize=True).float().numpy()
        print(f"[concepts] {len(out)} concepts encoded with {described}", file=sys.stderr)
        self._prompts[described] = out
        return out

    def decide(self, metadata: pa.Table) -> Removals:
        from curate.dedup.semantic import unit_rows

        config: ConceptsConfig = self.config
        reasons = np.full(metadata.num_rows, None, dtype=object)
        would_reject = {f"concept:{name}": 0 for name in config.concepts}
        embedded = pc.is_valid(metadata.column("image_embedding")).to_numpy(zero_copy_only=False)
        models = metadata.column("clip_model").to_pylist()
        for described in sorted({m for m, e in zip(models, embedded) if e and m}):
            rows = np.flatnonzero(embedded & (np.asarray(models, dtype=object) == described))
            images = unit_rows(metadata.column("image_embedding").take(rows))
            for name, prompts in self.prompt_embeddings(described).items():
                shows = (images @ prompts.T).max(axis=1) >= config.threshold
                would_reject[f"concept:{name}"] += int(shows.sum())
                undecided = reasons[rows] == None  # noqa: E711 (elementwise)
                reasons[rows[shows & undecided]] = f"concept:{name}"
        removed = np.flatnonzero(reasons != None)  # noqa: E711
        uids = np.asarray(metadata.column("uid").to_pylist(), dtype=object)
        return Removals.of(uids[removed].tolist(), reasons[removed].tolist(), would_reject=would_reject)
