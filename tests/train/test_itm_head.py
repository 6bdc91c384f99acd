"""The ITM head fuses only up to the longest text's last token: the same logits as fusing the whole padded context
(padding is masked as keys and never read), for a fraction of the work on short web captions."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from curate.models.clip import ClipSpec
from curate.models.itm import encode_with_tokens, head_for
from curate.train.loop import build_model


def test_fusing_to_the_longest_text_gives_the_full_contexts_logits() -> None:
    torch.manual_seed(0)
    model, _, tokenizer, _ = build_model(ClipSpec("curate-tiny"), ["clip", "itm"], "cpu")
    head = head_for(model).eval()
    # "!" is token 0, the padding id: a text whose middle reads as padding must not be cut at it
    texts = tokenizer(["a small red star", "star! on a white background, drawn", "ring"])
    assert texts.shape[1] == open_clip.get_model_config("curate-tiny")["text_cfg"]["context_length"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = encode_with_tokens(model, images, texts)
        fused = head.fusion(head.text_in(out["text_tokens"]), head.image_in(out["image_tokens"]),
                            tgt_key_padding_mask=out["text_padding"])
        pair = F.normalize(out["image_features"], dim=-1) * F.normalize(out["text_features"], dim=-1)
        whole_context = head.classify(head.norm(fused[:, 0]) + head.pair_in(pair))
        trimmed = head(out["image_tokens"], out["text_tokens"], out["text_padding"], out["image_features"],
                       out["text_features"])
    assert torch.allclose(trimmed, whole_context, atol=1e-5)
    assert not torch.allclose(trimmed[0], trimmed[1], atol=1e-3)  # the texts still tell the pairs apart
