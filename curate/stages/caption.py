"""The caption stage: synthetic captions from an image-to-text model, with provenance, selectively.

Models: any transformers image-to-text model that loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``
(BLIP, BLIP-2, GIT, Florence-2 and the like; a hub id or a folder; safetensors only, ``trust_remote_code`` off unless
set), or an open_clip CoCa (an architecture with a pretrained tag, or a checkpoint folder of the bundled trainer),
through its ``generate``.

Modes (Nguyen et al. 2023 mixed synthetic and raw captions; CapsFusion refines them):
- ``replace``: the synthetic caption becomes the caption;
- ``add``: both are kept — the raw one in ``.txt``, the synthetic one in ``.syn.txt``;
- ``best``: the caption with the higher CLIP score (the pipeline's scoring model) wins; ``clip_score`` follows it;
- ``rescue``: only rows scoring below ``rescue_below`` are captioned, then as in ``best`` — the alignment filter
  after it (``min_score`` = the same threshold) keeps the rows whose new caption passes, at a fraction of the GPU
  cost of captioning everything.
Every processed row records ``original_caption``, ``caption_source`` (raw or synthetic), ``caption_model``,
``caption_prompt`` and, where scored, ``raw_clip_score`` and ``synthetic_clip_score`` (in the sample's .json).

``model: bootstrap`` (BLIP's CapFilt without pretrained weights): after a bootstrapped score stage has scored the
stored pool, small CoCas are trained on the pairs its scores trust most, cross-fitted on the scorer's folds, so a
row is never captioned by a model that trained on it; each fold's rows are captioned by their CoCa and rescored by
their fold's scorer (curate.train.bootstrap_captions). Its default mode is ``rescue``: the rows outside the top
``rescue_outside_top`` of their fold's scores (the alignment filter's ``keep_top``) get a synthetic caption.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.errors import CurateError
from curate.config import Resources, StageConfig
from curate.core.stage import RowOutcomes, Stage
from curate.core.decoded import stored_rgb

RAW, SYNTHETIC = "raw", "synthetic"
SCORED_MODES = ("best", "rescue")
BOOTSTRAP = "bootstrap"


class CaptionBootstrap(BaseModel):
    """How ``caption.model: bootstrap`` trains its cross-fitted CoCas (on the bootstrapped score stage's folds)."""

    model_config = ConfigDict(extra="forbid")

    architecture: str = Field("curate-tiny-coca", description="the captioners' CoCa architecture (a model config "
                              "with multimodal_cfg; a small one trains on CPUs)")
    trust_top: float = Field(0.5, gt=0, le=1, description="share of each fold, by its bootstrapped scores, that the "
                             "captioners train on: the pairs the scores trust most")
    steps: int | None = Field(None, ge=1, description="training steps per captioner; null: `epochs` passes over "
                              "its training rows")
    epochs: float = Field(10.0, gt=0, description="passes over a captioner's training rows when `steps` is null")
    max_steps: int = Field(20_000, ge=1, description="at most this many steps per captioner, whatever the pool")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    def steps_for(self, training_rows: int, batch_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, min(self.max_steps, math.ceil(self.epochs * training_rows / max(1, batch_size))))


class ScorerSpec(BaseModel):
    """The CLIP that scores synthetic captions; filled from the pipeline's score stage when not given."""

    model_config = ConfigDict(extra="forbid")

    model: str
    pretrained: str | None = None
    architecture_file: str | None = None
    family: str = Field("auto", description="model family (curate.models.scorer.FAMILIES) or auto")

    def spec(self) -> Any:
        from curate.models.clip import ClipSpec

        return ClipSpec(self.model, self.pretrained, self.architecture_file, self.family)


class CaptionConfig(StageConfig):
    stage: Literal["caption"] = "caption"
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1.0, batch_size=32))
    model: str = Field(description="transformers image-to-text model (hub id or folder), an open_clip CoCa "
                       "(architecture name with `pretrained`, or a checkpoint folder), or 'bootstrap': small CoCas "
                       "cross-fitted on the pool after a bootstrapped score stage")
    backend: Literal["auto", "transformers", "open_clip"] = Field(
        "auto", description="auto: open_clip when the model is a CoCa architecture or checkpoint, else transformers")
    pretrained: str | None = Field(None, description="open_clip CoCa: pretrained tag or weights file")
    prompt: str | None = Field(None, description="text the caption starts from (BLIP: 'a picture of'); null: none")
    generation: dict[str, Any] = Field(default_factory=lambda: {"max_new_tokens": 30, "num_beams": 3},
                                       description="generate() settings (transformers names; CoCa maps "
                                       "max_new_tokens to seq_len)")
    trust_remote_code: bool = Field(False, description="run model code from the hub (Florence-2 needs it); off")
    mode: Literal["replace", "add", "best", "rescue"] = "best"
    rescue_below: float | None = Field(None, ge=-1, le=1, description="rescue: caption rows whose clip_score is "
                                       "below this (the alignment filter's min_score)")
    rescue_outside_top: float | None = Field(None, gt=0, le=1, description="model bootstrap, mode rescue: caption "
                                             "the rows outside the top share of their fold's scores (set it to the "
                                             "alignment filter's keep_top; default 0.7), instead of rescue_below")
    scorer: ScorerSpec | None = Field(None, description="best/rescue: the CLIP that scores both captions; default: "
                                      "the pipeline's score stage")
    bootstrap: CaptionBootstrap = Field(default_factory=CaptionBootstrap, description="used by model: bootstrap")

    @model_validator(mode="after")
    def _mode_needs(self) -> CaptionConfig:
        if self.model == BOOTSTRAP:
            if "mode" not in self.model_fields_set:
                self.mode = "rescue"  # CapFilt's use: new captions for the pairs the filter would drop
            if "generation" not in self.model_fields_set:
                self.generation = {"max_new_tokens": 20, "num_beams": 1}  # open_clip's beam search needs more
            if self.mode == "rescue" and self.rescue_below is None and self.rescue_outside_top is None:
                self.rescue_outside_top = 0.7
            if self.scorer is not None:
                raise ValueError("model bootstrap: each fold's rows are scored by their fold's bootstrapped scorer; "
                                 "leave scorer unset")
            from curate.models.clip import ClipSpec, architecture_config, check_spec

            spec = ClipSpec(self.bootstrap.architecture, family="open_clip")
            check_spec(spec)
            if "multimodal_cfg" not in (architecture_config(spec) or {"multimodal_cfg": None}):
                raise ValueError(f"bootstrap.architecture: {spec.model} is not a CoCa (its model config has no "
                                 "multimodal_cfg); use curate-tiny-coca or coca_ViT-B-32")
        elif self.rescue_outside_top is not None:
            raise ValueError("rescue_outside_top ranks rows by their fold's scores: it needs model bootstrap; use "
                             "rescue_below")
        if self.rescue_below is not None and self.rescue_outside_top is not None:
            raise ValueError("mode rescue: set rescue_below or rescue_outside_top, not both")
        if self.mode == "rescue" and self.rescue_below is None and self.rescue_outside_top is None:
            raise ValueError("mode rescue: set rescue_below, the clip_score under which rows are re-captioned")
        if self.mode != "rescue" and (self.rescue_below is not None or self.rescue_outside_top is not None):
            raise ValueError(f"rescue_below and rescue_outside_top only apply to mode rescue, not {self.mode}")
        return self

    def resolve_with(self, earlier: list[StageConfig]) -> None:
        """best/rescue score with the pipeline's (last earlier) score stage unless a scorer is given; bootstrapped
        captioners need a bootstrapped score stage, whose folds they share."""
        score = next((s for s in reversed(earlier) if s.stage == "score"), None)
        if self.model == BOOTSTRAP:
            if score is None or getattr(score, "model", None) != BOOTSTRAP:
                raise ValueError("model bootstrap: the captioners are cross-fitted on the folds of a bootstrapped "
                                 "score stage; put a score stage with model: bootstrap before caption")
            if self.mode in SCORED_MODES and not getattr(score, "store_embeddings", True):
                raise ValueError(f"mode {self.mode}: synthetic captions are scored against the stored image "
                                 "embeddings; set the score stage's store_embeddings: true")
            return
        if self.mode not in SCORED_MODES or self.scorer is not None:
            return
        if score is None:
            raise ValueError(f"mode {self.mode} compares CLIP scores: put a score stage before caption")
        if getattr(score, "model", None) == "bootstrap":
            raise ValueError(f"mode {self.mode}: a bootstrapped score stage scores after the stream; give caption a "
                             "scorer (model: a checkpoint folder) or use mode replace or add")
        spec = score.spec()  # type: ignore[attr-defined]
        self.scorer = ScorerSpec(model=spec.model, pretrained=spec.pretrained,
                                 architecture_file=spec.architecture_file, family=spec.family)


def uses_open_clip(config: CaptionConfig) -> bool:
    """auto: a checkpoint folder of open_clip's, an open_clip or bundled architecture name, or local-dir: → CoCa."""
    if config.backend != "auto":
        return config.backend == "open_clip"
    from pathlib import Path

    folder = Path(config.model).expanduser()
    if folder.is_dir():
        return (folder / "open_clip_config.json").exists()
    if config.model.startswith("local-dir:"):
        return True
    import open_clip

    from curate.models.clip import builtin_architectures

    return config.model in open_clip.list_models() or config.model in builtin_architectures()


class CaptionStage(Stage[CaptionConfig]):
    name = "caption"
    Config = CaptionConfig

    def inputs(self) -> list[str]:
        config: CaptionConfig = self.config
        scored = ["clip_score", "image_embedding"] if config.mode in SCORED_MODES else []
        return ["image", "caption", *scored]

    def outputs(self) -> dict[str, pa.DataType]:
        config: CaptionConfig = self.config
        columns = {"caption": pa.string(), "original_caption": pa.string(), "synthetic_caption": pa.string(),
                   "caption_source": pa.string(), "caption_model": pa.string(), "caption_prompt": pa.string()}
        if config.mode in SCORED_MODES:
            columns |= {"clip_score": pa.float32(), "raw_clip_score": pa.float32(),
                        "synthetic_clip_score": pa.float32()}
        return columns

    @property
    def deferred(self) -> bool:
        """Bootstrapped captioners train on the stored pool's scores: the runner captions after bootstrap scoring."""
        return self.config.model == BOOTSTRAP

    def preflight(self) -> None:
        config: CaptionConfig = self.config
        if self.deferred:
            from curate.models.clip import ClipSpec
            from curate.models.scorer import preflight_model

            preflight_model(ClipSpec(config.bootstrap.architecture))
            return
        if config.scorer is not None:
            from curate.models.scorer import preflight_model

            preflight_model(config.scorer.spec())

    def setup(self) -> None:
        import torch

        config: CaptionConfig = self.config
        if config.resources.gpus and not torch.cuda.is_available():
            raise CurateError("caption: resources.gpus is set but this worker sees no CUDA device")
        self._device = "cuda" if config.resources.gpus else "cpu"
        self._captioner = (_OpenClipCaptioner if uses_open_clip(config) else _TransformersCaptioner)(
            config, self._device)
        self._scorer = None
        if config.mode in SCORED_MODES and config.scorer is None:
            raise CurateError(f"caption: mode {config.mode} needs a scorer (the pipeline's score stage)")
        if config.scorer is not None:
            from curate.models.scorer import load_scorer

            self._scorer = load_scorer(config.scorer.spec(), self._device)

    def process(self, batch: pa.Table) -> pa.Table:
        config: CaptionConfig = self.config
        outcomes = RowOutcomes(batch.num_rows, self.outputs())
        raw = [c or "" for c in batch.column("caption").to_pylist()]
        scores = batch.column("clip_score").to_pylist() if config.mode in SCORED_MODES else [None] * len(raw)
        todo = [i for i in range(batch.num_rows)
                if config.mode != "rescue" or (scores[i] is not None and scores[i] < config.rescue_below)]
        images, captioned = [], []
        for i in todo:
            try:
                images.append(stored_rgb(batch.column("image")[i].as_py()))
                captioned.append(i)
            except Exception:  # a stored image that does not decode keeps its raw caption; it never fails the row
                continue
        synthetic = dict(zip(captioned, self._captioner(images))) if images else {}
        synthetic_scores = self._scores(batch, synthetic) if config.mode in SCORED_MODES else {}
        for i in range(batch.num_rows):
            text = synthetic.get(i) or None
            use = text is not None and (config.mode == "replace" or (
                config.mode in SCORED_MODES and synthetic_scores[i] > (scores[i] if scores[i] is not None else -2)))
            outcomes.set(i, "caption", text if use else raw[i])
            outcomes.set(i, "original_caption", raw[i])
            outcomes.set(i, "synthetic_caption", text)
            outcomes.set(i, "caption_source", SYNTHETIC if use else RAW)
            outcomes.set(i, "caption_model", self._captioner.name if i in synthetic else None)
            outcomes.set(i, "caption_prompt", config.prompt if i in synthetic else None)
            if config.mode in SCORED_MODES:
                new = synthetic_scores.get(i)
                outcomes.set(i, "raw_clip_score", scores[i])
                outcomes.set(i, "synthetic_clip_score", new)
                outcomes.set(i, "clip_score", new if use else scores[i])
        return outcomes.apply(batch)

    def _scores(self, batch: pa.Table, synthetic: dict[int, str]) -> dict[int, float]:
        """Cosine of each synthetic caption with the row's stored image embedding, from the scoring model."""
        from curate.dedup.semantic import unit_rows

        rows = [i for i, text in synthetic.items() if text]
        if not rows:
            return {}
        images = unit_rows(batch.column("image_embedding").take(pa.array(rows)))
        texts = self._scorer.embed_texts([synthetic[i] for i in rows])  # type: ignore[union-attr]
        return {i: float(s) for i, s in zip(rows, (images * texts).sum(axis=1))}


class _TransformersCaptioner:
    def __init__(self, config: CaptionConfig, device: str) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
        try:
            self.processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                config.model, trust_remote_code=config.trust_remote_code, use_safetensors=True,
                **({"dtype": dtype} if dtype else {})).to(device).eval()
        except (OSError, ValueError) as err:
            raise CurateError(f"caption.model {config.model}: cannot load it as a transformers image-to-text model "
                              f"with safetensors weights ({str(err).splitlines()[0]})") from None
        self.config, self.device, self.name = config, device, config.model

    def __call__(self, images: list) -> list[str]:
        import torch

        prompt = self.config.prompt
        inputs = self.processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, **self.config.generation)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


class _OpenClipCaptioner:
    """An open_clip CoCa through its own generate(); its tokens decoded by its tokenizer."""

    def __init__(self, config: CaptionConfig, device: str) -> None:
        from curate.models.clip import ClipSpec, load_clip

        spec = ClipSpec(config.model, config.pretrained, family="open_clip")
        self.clip = load_clip(spec, device)
        if not hasattr(self.clip.model, "generate"):
            raise CurateError(f"caption.model {config.model}: an open_clip model without generate() (not a CoCa)")
        self.config, self.device, self.name = config, device, spec.describe()

    def __call__(self, images: list) -> list[str]:
        import torch

        settings = dict(self.config.generation)
        seq_len = int(settings.pop("max_new_tokens", 30))
        beams = int(settings.pop("num_beams", 1))
        pixels = torch.stack([self.clip.preprocess(img) for img in images]).to(self.device)
        with torch.inference_mode():
            if beams <= 1:
                tokens = self._greedy(pixels, seq_len)
            else:
                from open_clip import coca_model

                if not coca_model._has_transformers:
                    raise CurateError("caption: open_clip's CoCa beam search needs generation classes this "
                                      "transformers version lacks; set generation.num_beams: 1 (greedy)")
                tokens = self.clip.model.generate(pixels, seq_len=seq_len, generation_type="beam_search",
                                                  num_beams=beams, num_beam_groups=1,
                                                  min_seq_len=min(5, seq_len - 1), **settings).tolist()
        return [_decode(self.clip.tokenizer, row) for row in tokens]

    def _greedy(self, pixels: Any, seq_len: int) -> list[list[int]]:
        """Greedy decoding through CoCa's multimodal decoder: the image encoded once, one token per step."""
        import torch

        model, tokenizer = self.clip.model, self.clip.tokenizer
        sot = getattr(tokenizer, "sot_token_id", None) or 49406
        eot = getattr(tokenizer, "eot_token_id", None) or 49407
        image_latent, image_embs = model._encode_image(pixels)
        tokens = torch.full((len(pixels), 1), sot, dtype=torch.long, device=pixels.device)
        done = torch.zeros(len(pixels), dtype=torch.bool, device=pixels.device)
        limit = min(seq_len, getattr(model, "context_length", 77) - 1)
        for _ in range(limit):
            logits = model(None, tokens, image_latent=image_latent, image_embs=image_embs,
                           output_labels=False)["logits"][:, -1]
            following = torch.where(done, torch.full_like(done, eot, dtype=torch.long), logits.argmax(-1))
            tokens = torch.cat([tokens, following[:, None]], dim=1)
            done |= following == eot
            if bool(done.all()):
                break
        return [[t for t in row if t not in (sot, eot)] for row in tokens.tolist()]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Token ids to text with the model's tokenizer: an HF tokenizer inside open_clip's wrapper, or open_clip's own
    SimpleTokenizer (whose markers are stripped)."""
    inner = getattr(tokenizer, "tokenizer", None)
    text = inner.decode(ids, skip_special_tokens=True) if inner is not None else tokenizer.decode(ids)
    for marker in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(marker, " ")
    return " ".join(text.split())
