"""Image-text matching (ALBEF/BLIP): a fusion head whose text tokens cross-attend to the image's patch tokens and
classify the pair as matched or not. Trained on hard negatives mined from the contrastive similarities of the same
batch; its match probability is a second alignment score (``itm_score``) next to the two-tower cosine.

The head sits beside an open_clip CLIP (ViT image tower) and is saved beside its weights in a checkpoint folder
(``itm_head.safetensors``, its shape under ``curate.itm_head`` in open_clip_config.json), so open_clip still loads
the folder as a plain CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "itm_head.safetensors"


class ItmHead(nn.Module):
    def __init__(self, image_width: int, text_width: int, embed_dim: int, width: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.shape = {"image_width": image_width, "text_width": text_width, "embed_dim": embed_dim, "width": width,
                      "layers": layers, "heads": heads}
        self.image_in = nn.Linear(image_width, width)
        self.text_in = nn.Linear(text_width, width)
        # the towers' own agreement (elementwise product of the normalised embeddings) enters beside the fused
        # token: a head trained from scratch starts from the two-tower signal and learns what cross-attention adds
        self.pair_in = nn.Linear(embed_dim, width)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.fusion = nn.TransformerDecoder(layer, layers)  # self-attention over text, cross-attention to image
        self.norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, 2)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_padding: torch.Tensor,
                image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Logits (n, 2): [not matched, matched], read at the text's first token (which sees the whole pair)."""
        # positions past every text's last token are padding everywhere: masked as keys and never read, so the
        # fusion runs on the longest text's length, not the context's (web captions fill a fraction of it)
        length = int(((~text_padding) * torch.arange(1, text_padding.shape[1] + 1, device=text_padding.device))
                     .max()) if text_padding.numel() else 0
        text_tokens, text_padding = text_tokens[:, :max(1, length)], text_padding[:, :max(1, length)]
        fused = self.fusion(self.text_in(text_tokens), self.image_in(image_tokens), tgt_key_padding_mask=text_padding)
        pair = F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)
        return self.classify(self.norm(fused[:, 0]) + self.pair_in(pair))


def head_for(model: Any, width: int = 128, layers: int = 2, heads: int = 4) -> ItmHead:
    visual = model.visual
    if not hasattr(visual, "output_tokens"):
        raise ValueError("itm needs an image tower that exposes patch tokens (an open_clip VisionTransformer)")
    text_width = model.text.width if hasattr(model, "text") else model.transformer.width
    embed_dim = visual.output_dim if hasattr(visual, "output_dim") else model.text_projection.shape[-1]
    return ItmHead(visual.transformer.width, text_width, embed_dim, width, layers, heads)


def encode_with_tokens(model: Any, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    """One pass of both towers: the pooled embeddings (as encode_image/encode_text give) and the token sequences."""
    visual = model.visual
    visual.output_tokens = True
    try:
        image_features, image_tokens = visual(images)
    finally:
        visual.output_tokens = False
    if hasattr(model, "text"):  # CustomTextCLIP: the text tower can hand out its tokens the same way
        model.text.output_tokens = True
        try:
            text_features, text_tokens = model.text(texts)
        finally:
            model.text.output_tokens = False
    else:  # CLIP keeps its text tower inline: the same steps as CLIP.encode_text, keeping the token states
        from open_clip.transformer import text_global_pool

        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(texts).to(cast) + model.positional_embedding.to(cast)
        text_tokens = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        pooled = text_global_pool(text_tokens, texts, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        text_features = pooled @ model.text_projection if not isinstance(model.text_projection, nn.Linear) \
            else model.text_projection(pooled)
    return {"image_features": image_features, "text_features": text_features, "image_tokens": image_tokens,
            "text_tokens": text_tokens, "text_padding": texts == 0}


def itm_loss(head: ItmHead, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the batch's pairs, a hard negative text for each image and a hard negative image for each
    text, sampled in proportion to their contrastive similarity (the right partner excluded)."""
    n = out["image_tokens"].shape[0]
    with torch.no_grad():
        image = F.normalize(out["image_features"].float(), dim=-1)
        text = F.normalize(out["text_features"].float(), dim=-1)
        similarity = image @ text.T
        weights = torch.softmax(similarity * 10, dim=1).fill_diagonal_(0) + 1e-8
        negative_text = torch.multinomial(weights, 1).squeeze(1)
        negative_image = torch.multinomial(torch.softmax(similarity.T * 10, dim=1).fill_diagonal_(0) + 1e-8, 1).squeeze(1)
    images = torch.cat([torch.arange(n), torch.arange(n), negative_image.cpu()]).to(out["image_tokens"].device)
    texts = torch.cat([torch.arange(n), negative_text.cpu(), torch.arange(n)]).to(out["image_tokens"].device)
    logits = head(out["image_tokens"][images], out["text_tokens"][texts], out["text_padding"][texts],
                  out["image_features"][images], out["text_features"][texts])
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def match_probability(model: Any, head: ItmHead, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    out = encode_with_tokens(model, images, texts)
    logits = head(out["image_tokens"], out["text_tokens"], out["text_padding"], out["image_features"],
                  out["text_features"])
    return torch.softmax(logits.float(), dim=-1)[:, 1]


def save_head(head: ItmHead, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(Path(folder) / HEAD_FILE))


def load_head(folder: Path, device: str = "cpu") -> ItmHead | None:
    """The head saved in a checkpoint folder, or None if the folder has none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    shape = config.get("curate", {}).get("itm_head")
    if not shape or not (folder / HEAD_FILE).exists():
        return None
    head = ItmHead(**shape)
    head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return head.to(device).eval()
