"""The model seam: one interface for every family of image-text embedding models, and the registry of families.

A ``Scorer`` is what the score, concepts and caption stages and ``curate eval`` use of a model: its eval
preprocessing (one PIL image to one tensor, run in threads), its image and text encoders, its embedding width and
the name stored beside every score. A family (open_clip, transformers) is a module that exposes ``FAMILY``, a
``ModelFamily`` saying which specs it claims and how it checks, preflights and loads one. Adding a family is that
module and one line in ``FAMILIES``.

Nothing here imports torch; a family imports it when it loads a model.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from curate.errors import CurateError

if TYPE_CHECKING:
    import numpy as np

    from curate.models.clip import ClipSpec

AUTO = "auto"
# family name -> the module that defines its FAMILY (imported only when a spec of that family is checked or loaded)
FAMILIES: dict[str, str] = {
    "open_clip": "curate.models.clip",
    "transformers": "curate.models.hf_clip",
}
DEFAULT_FAMILY = "open_clip"  # what a bare architecture name or hub id means when no family is named


class Scorer(ABC):
    """A loaded image-text model in eval mode on its device."""

    name: str  # what stored scores say they were computed with (clip_model)
    device: str

    @abstractmethod
    def preprocess(self, image: Any) -> Any:
        """One RGB PIL image to the model's input tensor (C, H, W), as the model's own eval transform does."""

    @abstractmethod
    def encode_images(self, pixels: Any) -> Any:
        """(n, C, H, W) on the device to (n, embedding_width) image features, not normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> Any:
        """Texts to (n, embedding_width) text features on the device, not normalised (tokenised as the model was
        trained: its tokenizer, context length and padding)."""

    @property
    def embedding_width(self) -> int:
        """The width of both embeddings (read off one encoded text: every family and architecture agrees)."""
        if not hasattr(self, "_width"):
            import torch

            with torch.inference_mode():
                self._width = int(self.encode_texts(["a"]).shape[-1])
        return self._width

    def embed_texts(self, texts: Sequence[str], batch: int = 256) -> np.ndarray:
        """L2-normalised float32 text embeddings, in batches (1000 classes × 80 templates is 80,000 prompts)."""
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                features = self.encode_texts(list(texts[i:i + batch])).float()
                out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embedding_width), np.float32)

    def embed_images(self, pixels: Any) -> np.ndarray:
        """L2-normalised float32 image embeddings of preprocessed pixels."""
        import torch

        with torch.inference_mode():
            features = self.encode_images(pixels.to(self.device)).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


@dataclass(frozen=True)
class ModelFamily:
    """What curate needs of a family: which specs it claims under ``family: auto``, a check without torch or the
    network (raises ValueError with a message to act on), a preflight in the driver before any work (raises
    CurateError), and the loader."""

    name: str
    claims: Callable[[ClipSpec], bool]
    check: Callable[[ClipSpec], None]
    preflight: Callable[[ClipSpec], None]
    load: Callable[[ClipSpec, str], Scorer]


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}'; known: {', '.join([AUTO, *FAMILIES])}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def check_family_name(name: str) -> str:
    """For config validators: the name, if it is ``auto`` or a registered family."""
    if name != AUTO:
        family(name)
    return name


def resolve_family(spec: ClipSpec) -> str:
    """The family of a spec whose family is ``auto``: the first other family that claims it, else open_clip."""
    for name in FAMILIES:
        if name != DEFAULT_FAMILY and family(name).claims(spec):
            return name
    return DEFAULT_FAMILY


def check_model(spec: ClipSpec) -> None:
    """ValueError with a message to act on when the spec cannot name a loadable model (no torch, no network)."""
    family(spec.family).check(spec)


def preflight_model(spec: ClipSpec) -> None:
    try:
        check_model(spec)
    except ValueError as err:
        raise CurateError(str(err)) from None
    family(spec.family).preflight(spec)


def load_scorer(spec: ClipSpec, device: str = "cpu") -> Scorer:
    return family(spec.family).load(spec, device)
