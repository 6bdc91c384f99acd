"""Loss terms, each returning a dict of ``*_loss`` tensors that the loop sums (open_clip's convention)."""

from __future__ import annotations

from typing import Any


def make_losses(objectives: list[str]) -> Any:
    """A callable: model outputs (open_clip's output dict) -> {"clip_loss": ..., "siglip_loss": ...}."""
    from open_clip.loss import ClipLoss, SigLipLoss

    terms = {"clip": ClipLoss(), "siglip": SigLipLoss()}

    def losses(out: dict[str, Any]) -> dict[str, Any]:
        result = {}
        for name in objectives:
            if name == "clip":  # InfoNCE both ways, temperature learned through logit_scale
                result["clip_loss"] = terms["clip"](out["image_features"], out["text_features"], out["logit_scale"])
            elif name == "siglip":  # a sigmoid per pair, with a learned bias
                result["siglip_loss"] = terms["siglip"](out["image_features"], out["text_features"],
                                                        out["logit_scale"], out["logit_bias"])
        return result

    return losses
