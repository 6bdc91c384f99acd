"""The score stage: CLIP image and text embeddings, once per sample, and their cosine as ``clip_score``.

Every later decision (thresholds, top-k%, semantic dedup, caption choice) is a query over what this stage stores:
``clip_score`` and ``clip_model`` in the metadata (and each sample's .json), and L2-normalised float16
``image_embedding`` / ``text_embedding`` that the writer publishes under ``embeddings/`` keyed by uid.

The model loads once per actor in ``setup()``. Images are decoded and put through the model's own eval transform by
a thread pool (Pillow releases the GIL) while the previous chunk runs on the device, so the GPU is not left waiting
on one CPU thread.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.errors import CurateError
from curate.models.clip import ClipSpec, check_spec
from curate.models.scorer import AUTO, check_family_name, check_model, load_scorer, preflight_model
from curate.config import Resources, StageConfig
from curate.core.stage import RowOutcomes, Stage
from curate.core.decoded import stored_rgb

log = logging.getLogger(__name__)

EMBEDDING = pa.list_(pa.float16())


BOOTSTRAP = "bootstrap"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


class BootstrapConfig(BaseModel):
    """How `model: bootstrap` trains its cross-fitted scorers on the pool itself."""

    model_config = ConfigDict(extra="forbid")

    def steps_for(self, training_rows: int, batch_size: int) -> int:
        """The steps of one scorer: ``steps`` when set, else ``epochs`` passes over its rows (at most max_steps)."""
        if self.steps is not None:
            return self.steps
        return max(1, min(self.max_steps, math.ceil(self.epochs * training_rows / max(1, batch_size))))

    folds: int = Field(3, ge=2, le=20, description="K: each fold is scored by a model trained on the other K-1")
    architecture: str = Field("curate-tiny", description="the scorers' architecture (a small one trains on CPUs)")
    steps: int | None = Field(None, ge=1, description="training steps per scorer; null: `epochs` passes over its "
                              "training rows")
    epochs: float = Field(6.0, gt=0, description="passes over a scorer's training rows when `steps` is null (the "
                          "step count scales with the pool). On the development pool (4.4k rows, 25% shuffled "
                          "captions, benchmarks/efficacy.py) 6 epochs (300 steps of 64) gave ROC AUC 0.691; 20 "
                          "epochs 0.685, a 2× learning rate 0.676, the 64 px curate-small 0.690, 5 folds 0.691, "
                          "a second round 0.681, drop_noisiest 0.3 0.694")
    max_steps: int = Field(20_000, ge=1, description="at most this many steps per scorer, whatever the pool")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    rounds: int = Field(1, ge=1, le=5, description="rounds of BLIP-style bootstrapping: each round after the first "
                        "trains only on the rows the previous round ranked in its top `keep_top`, then rescores all")
    keep_top: float = Field(0.7, gt=0, le=1, description="share of each fold (by the previous round's scores) that "
                            "the next round trains on")
    drop_noisiest: float = Field(0.0, ge=0, lt=1, description="the share of each training batch's pairs with the "
                                 "highest loss left out of the update (train.drop_noisiest): a shuffled caption is "
                                 "learned last, so it is left out instead of memorised (0.3: ROC AUC 0.694 against "
                                 "0.691 on the development pool, within run-to-run noise)")


class ScoreConfig(StageConfig):
    stage: Literal["score"] = "score"
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1.0, batch_size=256))
    model: str = Field("ViT-B-32", description="open_clip architecture, 'hf-hub:org/repo', a checkpoint folder "
                                               "('local-dir:/path' or the path: open_clip_config.json + weights), "
                                               "a transformers CLIP/SigLIP (hub id with family: transformers, or "
                                               "its folder), or 'bootstrap': small CLIPs cross-fitted on the pool")
    family: str = Field(AUTO, description="model family (curate.models.scorer.FAMILIES): open_clip, transformers; "
                        "auto: transformers for a folder in its layout (config.json), else open_clip")
    pretrained: str | None = Field(
        DEFAULT_PRETRAINED, description="pretrained tag or weights file for an architecture name (null: random "
                                         "init); ignored for hf-hub and checkpoint folders")
    architecture_file: str | None = Field(
        None, description="model-config JSON of a custom architecture, registered under its file stem")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it (else fp16), fp32 on CPU")
    store_embeddings: bool = Field(True, description="keep image and text embeddings (float16) under embeddings/")
    preprocess_threads: int = Field(4, ge=1, description="threads decoding and preprocessing images per worker")
    chunk_size: int = Field(64, ge=1, description="rows per forward pass (a batch is cut into chunks)")
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig, description="used by model: bootstrap")
    itm: bool = Field(False, description="also itm_score: the match probability of the checkpoint's image-text "
                                         "matching head (a folder trained with objectives [clip, itm])")

    @field_validator("family")
    @classmethod
    def _family_known(cls, value: str) -> str:
        return check_family_name(value)

    @model_validator(mode="after")
    def _spec_resolves(self) -> ScoreConfig:
        # paths absolute here, in the driver: workers elsewhere (other nodes, other working folders) get the same
        for key in ("model", "pretrained", "architecture_file"):
            value = getattr(self, key)
            if value and value != BOOTSTRAP and not value.startswith(("hf-hub:", "local-dir:")) \
                    and Path(value).expanduser().exists():
                object.__setattr__(self, key, str(Path(value).expanduser().resolve()))
        if self.model == BOOTSTRAP:
            if self.itm:
                raise ValueError("itm: the bootstrapped scorers are two-tower CLIPs without a matching head")
            check_spec(ClipSpec(self.bootstrap.architecture))
            return self
        if self.itm and self.spec().family != "open_clip":
            raise ValueError("itm: the image-text matching head is trained on open_clip checkpoints (curate train)")
        check_model(self.spec())
        return self

    def spec(self) -> ClipSpec:
        """The model to load; ``pretrained`` is open_clip's, so its default is dropped for other families."""
        spec = ClipSpec(self.model, None, self.architecture_file, self.family)
        if spec.family == "open_clip" or self.pretrained != DEFAULT_PRETRAINED:
            spec = ClipSpec(spec.model, self.pretrained, self.architecture_file, spec.family)
        return spec


class ScoreStage(Stage[ScoreConfig]):
    name = "score"
    Config = ScoreConfig
    funnel = (("score", "scored"),)

    def inputs(self) -> list[str]:
        return ["image", "caption"]

    def outputs(self) -> dict[str, pa.DataType]:
        columns: dict[str, pa.DataType] = {"clip_score": pa.float32(), "clip_model": pa.string()}
        if self.config.itm:
            columns["itm_score"] = pa.float32()
        if self.config.store_embeddings:
            columns |= {"image_embedding": EMBEDDING, "text_embedding": EMBEDDING}
        return columns

    @property
    def deferred(self) -> bool:
        """Bootstrapped scores need the whole pool stored first: the runner scores after the per-sample stream."""
        return self.config.model == BOOTSTRAP

    def preflight(self) -> None:
        cfg: ScoreConfig = self.config
        if self.deferred:
            preflight_model(ClipSpec(cfg.bootstrap.architecture))
            return
        preflight_model(cfg.spec())
        if cfg.itm:
            self._itm_folder()

    def _itm_folder(self) -> Path:
        cfg: ScoreConfig = self.config
        name = cfg.spec().open_clip_name()
        folder = Path(name.removeprefix("local-dir:"))
        if not name.startswith("local-dir:") or not (folder / "itm_head.safetensors").exists():
            raise CurateError(f"score.itm: {cfg.model} has no image-text matching head (itm_head.safetensors); "
                              "train one with `curate train --set objectives=[clip,itm]` and score with its folder")
        return folder

    def setup(self) -> None:
        import torch

        cfg: ScoreConfig = self.config
        self._torch = torch
        if cfg.resources.gpus > 0:
            if not torch.cuda.is_available():
                raise CurateError(f"score.resources.gpus is {cfg.resources.gpus:g} but this worker sees no CUDA "
                                  "device; set score.resources.gpus: 0 to score on CPUs")
            self._device = "cuda"
        else:
            self._device = "cpu"
            if _in_ray_worker():  # a worker owns its declared CPUs, not every core of a shared node
                torch.set_num_threads(max(1, int(round(cfg.resources.cpus))))
        self._clip = load_scorer(cfg.spec(), self._device)
        self._itm_head = None
        if cfg.itm:
            from curate.models.itm import load_head

            self._itm_head = load_head(self._itm_folder(), self._device)
        self._autocast = self._autocast_dtype(cfg.precision)
        self._threads = ThreadPoolExecutor(cfg.preprocess_threads, thread_name_prefix="score-preprocess")

    def _autocast_dtype(self, precision: str):
        torch = self._torch
        if precision == "fp32" or (precision == "auto" and self._device == "cpu"):
            return None
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _pixels(self, data: bytes | None):
        """The model's input tensor for one stored image, or None for bytes that do not decode."""
        if not data:
            return None
        try:
            return self._clip.preprocess(stored_rgb(data))
        except Exception:  # a stored image that no longer decodes is this row's failure, not the batch's
            return None

    def process(self, batch: pa.Table) -> pa.Table:
        cfg: ScoreConfig = self.config
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        pixels = self._threads.map(self._pixels, batch.column("image").to_pylist())  # all submitted now, taken in order
        chunk: list[tuple[int, object]] = []
        for i, tensor in enumerate(pixels):
            if tensor is None:
                outcomes.fail(i, "score:bad_image")
                continue
            chunk.append((i, tensor))
            if len(chunk) == cfg.chunk_size:
                self._score(chunk, captions, outcomes)
                chunk = []
        if chunk:
            self._score(chunk, captions, outcomes)
        return outcomes.apply(batch)

    def _score(self, chunk: list[tuple[int, object]], captions: list[str], outcomes: RowOutcomes) -> None:
        torch = self._torch
        rows = [i for i, _ in chunk]
        images = torch.stack([t for _, t in chunk]).to(self._device, non_blocking=True)
        texts = [captions[i] for i in rows]
        match = None
        with torch.inference_mode(), torch.autocast(self._device, dtype=self._autocast or torch.float32,
                                                    enabled=self._autocast is not None):
            if self._itm_head is None:
                image_features = self._clip.encode_images(images)
                text_features = self._clip.encode_texts(texts)
            else:  # one pass of both towers gives the embeddings and the tokens the fusion head reads
                from curate.models.itm import encode_with_tokens

                tokens = self._clip.tokenizer(texts).to(self._device, non_blocking=True)  # type: ignore[attr-defined]
                out = encode_with_tokens(self._clip.model, images, tokens)  # type: ignore[attr-defined]
                image_features, text_features = out["image_features"], out["text_features"]
                logits = self._itm_head(out["image_tokens"], out["text_tokens"], out["text_padding"],
                                        image_features, text_features)
                match = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
        # normalise and compare in fp32 whatever the forward ran in
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        scores = (image_features * text_features).sum(dim=-1).cpu().numpy()
        image_half = image_features.half().cpu().numpy()
        text_half = text_features.half().cpu().numpy()
        store = "image_embedding" in outcomes.columns
        for j, i in enumerate(rows):
            outcomes.set(i, "clip_score", float(scores[j]))
            outcomes.set(i, "clip_model", self._clip.name)
            if match is not None:
                outcomes.set(i, "itm_score", float(match[j]))
            if store:
                outcomes.set(i, "image_embedding", image_half[j])
                outcomes.set(i, "text_embedding", text_half[j])


def _in_ray_worker() -> bool:
    """True in a Ray task or actor; False in a driver, a notebook or a test that scores in-process, whose
    thread count is its own to set."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
