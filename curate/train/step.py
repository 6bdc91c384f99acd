"""One training step's forward as a module: model, optional fusion head and the summed loss terms.

Wrapping model and head together lets DistributedDataParallel see every trained parameter in one forward, whatever
path that forward takes (open_clip's own, or the token-level pass an ITM head needs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def forward(model: Any, images: torch.Tensor, texts: torch.Tensor, with_tokens: bool) -> dict[str, Any]:
    """open_clip's output dict; with the towers' token states as well when a fusion head needs them."""
    if not with_tokens:
        return model(images, texts)
    from curate.models.itm import encode_with_tokens

    out = encode_with_tokens(model, images, texts)
    out["image_features"] = F.normalize(out["image_features"], dim=-1)
    out["text_features"] = F.normalize(out["text_features"], dim=-1)
    out["logit_scale"] = model.logit_scale.exp()
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias
    return out


class TrainStep(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, head: torch.nn.Module | None,
                 losses: Callable[[dict[str, Any]], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.model, self.head, self.losses = model, head, losses

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.losses(forward(self.model, images, texts, with_tokens=self.head is not None))
