"""Loss terms, each returning a dict of ``*_loss`` tensors that the loop sums (open_clip's convention)."""

from __future__ import annotations

from typing import Any


def small_loss_clip(image: Any, text: Any, scale: Any, drop: float) -> Any:
    """InfoNCE both ways, averaged over the pairs of the batch with the smallest loss: the ``drop`` share with the
    largest is left out. A pair whose caption belongs to another picture keeps a high loss while the model learns
    the clean ones, so it is the one left out rather than memorised (the small-loss trick of noisy-correspondence
    training: co-teaching, NCR). Every pair still serves as a negative for the others."""
    import math

    import torch
    import torch.nn.functional as F

    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    per_pair = (F.cross_entropy(logits, labels, reduction="none")
                + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    keep = max(1, math.ceil((1 - drop) * len(per_pair)))
    return torch.topk(per_pair, keep, largest=False).values.mean()


def make_losses(objectives: list[str], itm_head: Any = None, rank: int = 0, world: int = 1) -> Any:
    """A callable: model outputs (open_clip's output dict, plus token states for itm) -> {"clip_loss": ..., ...}.

    With several ranks, the contrastive terms gather every rank's features (open_clip's way): the negatives are the
    global batch's. The ITM head mines its hard negatives within each rank's batch. Setting the callable's ``drop``
    (a share, 0 by default; the loop sets it per step) leaves the noisiest pairs out of the clip term."""
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    ranks = {"rank": rank, "world_size": world}
    terms = {"clip": ClipLoss(**ranks), "siglip": SigLipLoss(**ranks),
             "coca": CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, **ranks)}  # CoCa paper's weights

    def losses(out: dict[str, Any]) -> dict[str, Any]:
        result = {}
        for name in objectives:
            if name == "clip" and losses.drop > 0:  # type: ignore[attr-defined]
                result["clip_loss"] = small_loss_clip(out["image_features"], out["text_features"],
                                                      out["logit_scale"], losses.drop)  # type: ignore[attr-defined]
            elif name == "clip":  # InfoNCE both ways, temperature learned through logit_scale
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
                from curate.models.itm import itm_loss

                result["itm_loss"] = itm_loss(itm_head, out)
        return result

    losses.drop = 0.0  # type: ignore[attr-defined]
    return losses
