"""Loss terms, each returning a dict of ``*_loss`` tensors that the loop sums (open_clip's convention)."""

from __future__ import annotations

from typing import Any


def make_losses(objectives: list[str], itm_head: Any = None, rank: int = 0, world: int = 1) -> Any:
    """A callable: model outputs (open_clip's output dict, plus token states for itm) -> {"clip_loss": ..., ...}.

    With several ranks, the contrastive terms gather every rank's features (open_clip's way): the negatives are the
    global batch's. The ITM head mines its hard negatives within each rank's batch."""
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    ranks = {"rank": rank, "world_size": world}
    terms = {"clip": ClipLoss(**ranks), "siglip": SigLipLoss(**ranks),
             "coca": CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, **ranks)}  # CoCa paper's weights

    def losses(out: dict[str, Any]) -> dict[str, Any]:
        result = {}
        for name in objectives:
            if name == "clip":  # InfoNCE both ways, temperature learned through logit_scale
                result["clip_loss"] = terms["clip"](out["image_features"], out["text_features"], out["logit_scale"])
            elif name == "siglip":  # a sigmoid per pair, with a learned bias
                result["siglip_loss"] = terms["siglip"](out["image_features"], out["text_features"],
                                                        out["logit_scale"], out["logit_bias"])
            elif name == "coca":  # contrastive over pooled embeddings + next-token captioning through the
                # multimodal decoder, which cross-attends from text tokens to image tokens (the fusion part)
                contrastive, caption = terms["coca"](out["image_features"], out["text_features"], out["logits"],
                                                     out["labels"], out["logit_scale"])
                result["coca_contrastive_loss"], result["coca_caption_loss"] = contrastive, caption
            elif name == "itm":  # matched / not matched through the fusion head, on mined hard negatives
                from curate.train.itm import itm_loss

                result["itm_loss"] = itm_loss(itm_head, out)
        return result

    return losses
