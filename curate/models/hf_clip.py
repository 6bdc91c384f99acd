"""The transformers model family: CLIP and SigLIP checkpoints through ``AutoModel`` + ``AutoProcessor``.

A spec names a hub id (``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``) with
``family: transformers`` (or the prefix ``transformers:``), or a local folder in transformers' layout (config.json,
safetensors weights, the processor's files), which ``family: auto`` recognises by its config.json. Weights load from
safetensors only and never with remote code. Texts are tokenised as each model was trained: SigLIP pads to its full
context length, CLIP to the longest text. ``clip_score`` is the cosine of the two embeddings for both (SigLIP's
match probability is a monotone function of it, so thresholds and top-k% rank the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.models.scorer import ModelFamily, Scorer

# model_type of config.json -> how its tokenizer pads (what the model saw in training)
SUPPORTED = {"clip": "longest", "siglip": "max_length"}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def claims(spec: Any) -> bool:
    """A local folder in transformers' layout (config.json, not open_clip's open_clip_config.json)."""
    folder = _folder(spec.model)
    return folder is not None and (folder / "config.json").is_file() \
        and not (folder / "open_clip_config.json").exists()


def check(spec: Any) -> None:
    if spec.pretrained or spec.architecture_file:
        raise ValueError(f"'{spec.model}': pretrained and architecture_file are open_clip's; a transformers model's "
                         "weights and architecture are in its folder or hub repository")
    folder = _folder(spec.model)
    if folder is None:
        if spec.model.startswith(("/", "./", "../", "~")):
            raise ValueError(f"transformers model folder {spec.model} does not exist")
        if spec.model.count("/") != 1 or not all(spec.model.split("/")):
            raise ValueError(f"'{spec.model}': a transformers model is a folder or a hub id like 'org/name'")
        return
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}/config.json is not readable JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED:
        raise ValueError(f"{folder}: model_type '{model_type}' is not an image-text embedding model curate scores "
                         f"with (supported: {', '.join(SUPPORTED)})")
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "none"
        raise ValueError(f"{folder}: no safetensors weights (found: {found}); curate loads safetensors only — "
                         "convert with save_pretrained(safe_serialization=True)")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ValueError(f"{folder}: no processor config ({' or '.join(PROCESSOR_FILES)}); save the model's "
                         "processor beside it (processor.save_pretrained)")


def preflight(spec: Any) -> None:
    """A hub id is resolved now (its config from the hub or the local cache), not in every worker."""
    if _folder(spec.model) is not None:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.model)
    except (OSError, ValueError) as err:
        raise CurateError(f"transformers model {spec.model}: cannot read its config from the hub or the local "
                          f"cache ({str(err).splitlines()[0]})") from None
    if config.model_type not in SUPPORTED:
        raise CurateError(f"transformers model {spec.model}: model_type '{config.model_type}' is not one curate "
                          f"scores with (supported: {', '.join(SUPPORTED)})")


class TransformersScorer(Scorer):
    def __init__(self, spec: Any, device: str) -> None:
        from transformers import AutoModel, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(spec.model)
            self.model = AutoModel.from_pretrained(spec.model, use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise CurateError(f"transformers model {spec.model}: cannot load it with safetensors weights and its "
                              f"processor ({str(err).splitlines()[0]})") from None
        model_type = self.model.config.model_type
        if model_type not in SUPPORTED:
            raise CurateError(f"transformers model {spec.model}: model_type '{model_type}' is not supported")
        self.name, self.device = spec.describe(), device
        self._padding = SUPPORTED[model_type]
        self._max_length = int(self.model.config.text_config.max_position_embeddings)
        tokenizer = self.processor.tokenizer
        self._text_inputs = [k for k in ("input_ids", "attention_mask") if k in tokenizer.model_input_names]

    def preprocess(self, image: Any) -> Any:
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def encode_images(self, pixels: Any) -> Any:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_texts(self, texts: Sequence[str]) -> Any:
        tokens = self.processor.tokenizer(list(texts), padding=self._padding, truncation=True,
                                          max_length=self._max_length, return_tensors="pt")
        inputs = {k: tokens[k].to(self.device, non_blocking=True) for k in self._text_inputs}
        return _pooled(self.model.get_text_features(**inputs))


def _pooled(out: Any) -> Any:
    """transformers 5 returns the projected embedding as the output's pooler_output, 4.x the tensor itself."""
    return out if hasattr(out, "shape") else out.pooler_output


FAMILY = ModelFamily(name="transformers", claims=claims, check=check, preflight=preflight,
                     load=lambda spec, device: TransformersScorer(spec, device))
