"""`curate eval`: image->text and text->image recall@K, and zero-shot classification, for any model a ClipSpec names
(an open_clip model or checkpoint, or a transformers CLIP/SigLIP: curate.models.scorer).

The eval set is WebDataset shards (image + .txt, an optional label in the .json) or a parquet with ``image_path``
(or ``image`` bytes), ``caption`` and optional ``label`` columns.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.models.scorer import Scorer, load_scorer, preflight_model
from curate.train.data import IMAGE_KEYS, shard_list

KS = (1, 5, 10)


def load_pairs(data: str | list[str], label_key: str = "label") -> list[dict[str, Any]]:
    """[{"image": bytes, "caption": str, "label": str | None}] in a stable order."""
    if isinstance(data, str) and data.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(data)
        if "caption" not in table.column_names or not {"image", "image_path"} & set(table.column_names):
            raise CurateError(f"{data}: an eval parquet needs caption and image_path (or image) columns")
        rows = table.to_pylist()
        base = Path(data).parent
        return [{"image": row.get("image") or (base / row["image_path"]).read_bytes(), "caption": row["caption"],
                 "label": row.get(label_key)} for row in rows]
    paths = shard_list(data)
    pairs = _parquet_pairs(paths) if paths[0].endswith(".parquet") else _tar_pairs(paths, label_key)
    if len(pairs) < 2:
        raise CurateError(f"eval data {data}: fewer than two image-caption pairs")
    return pairs


def _parquet_pairs(paths: list[str]) -> list[dict[str, Any]]:
    """Parquet shards (curate's output.format parquet, or any parquet with image bytes and a caption)."""
    from curate.train.data import parquet_samples

    return [{"image": next(sample[k] for k in IMAGE_KEYS if k in sample),
             "caption": sample["txt"].decode("utf-8", "replace"), "label": None}
            for path in paths for sample in parquet_samples(path)]


def _tar_pairs(paths: list[str], label_key: str) -> list[dict[str, Any]]:
    pairs = []
    for path in paths:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key in sorted(samples):
            sample = samples[key]
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if image is None or "txt" not in sample:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            pairs.append({"image": image, "caption": sample["txt"].decode("utf-8", "replace"),
                          "label": meta.get(label_key)})
    return pairs


def decodable(pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The pairs whose image decodes, and how many did not (they are left out of every metric, and counted)."""
    from PIL import Image

    good = []
    for pair in pairs:
        try:
            with Image.open(io.BytesIO(pair["image"])) as img:
                img.convert("RGB")
            good.append(pair)
        except Exception:  # whatever Pillow raises on a bad file: the pair is skipped, not the eval
            continue
    return good, len(pairs) - len(good)


def embed(scorer: Scorer, images: Sequence[bytes], texts: Sequence[str], batch: int = 256) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """L2-normalised float32 embeddings of images and texts."""
    import torch
    from PIL import Image

    chunks = [scorer.embed_images(torch.stack([scorer.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                               for b in images[i:i + batch]]))
              for i in range(0, len(images), batch)]
    return np.concatenate(chunks), scorer.embed_texts(texts, batch)


def retrieval(image: np.ndarray, text: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K both ways; pair i's text is the one right answer for image i (and the other way round)."""
    similarity = image @ text.T
    truth = np.diag(similarity)[:, None]
    image_rank = (similarity > truth).sum(axis=1)  # texts scored above the right one
    text_rank = (similarity.T > truth).sum(axis=1)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((image_rank < k).mean())
        metrics[f"text_to_image_R@{k}"] = float((text_rank < k).mean())
    return metrics


def zero_shot(scorer: Scorer, image: np.ndarray, labels: Sequence[str], classnames: Sequence[str],
              templates: Sequence[str]) -> float:
    """Top-1 accuracy of the class whose prompt embeddings (averaged over templates) are closest to each image."""
    unknown = sorted(set(labels) - set(classnames))
    if unknown:
        raise CurateError(f"eval labels {unknown[:5]} are not among the classes given")
    prompts = [template.format(name) for name in classnames for template in templates]
    text = scorer.embed_texts(prompts)
    per_class = text.reshape(len(classnames), len(templates), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    predicted = np.asarray(classnames)[(image @ per_class.T).argmax(axis=1)]
    return float((predicted == np.asarray(labels)).mean())


def evaluate(spec: ClipSpec, data: str | list[str], *, classnames: Sequence[str] = (),
             templates: Sequence[str] = ("a photo of a {}.",), label_key: str = "label",
             device: str = "cpu") -> dict[str, Any]:
    pairs, undecodable = decodable(load_pairs(data, label_key))
    if len(pairs) < 2:
        raise CurateError(f"eval data {data}: fewer than two pairs whose image decodes")
    preflight_model(spec)
    scorer = load_scorer(spec, device)
    image, text = embed(scorer, [p["image"] for p in pairs], [p["caption"] for p in pairs])
    results: dict[str, Any] = {"model": scorer.name, "pairs": len(pairs), "undecodable": undecodable,
                               **retrieval(image, text)}
    if classnames:
        labelled = [i for i, p in enumerate(pairs) if p["label"] is not None]
        if not labelled:
            raise CurateError(f"zero-shot: no eval sample has a '{label_key}'")
        results["zero_shot_top1"] = zero_shot(scorer, image[labelled], [str(pairs[i]["label"]) for i in labelled],
                                              classnames, templates)
        results["zero_shot_samples"] = len(labelled)
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{results['model']} on {results['pairs']} pairs")
    print(f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for way, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        print(f"{label:16}" + "".join(f"{results[f'{way}_R@{k}']:>8.3f}" for k in KS))
    if "zero_shot_top1" in results:
        print(f"zero-shot top-1: {results['zero_shot_top1']:.3f} ({results['zero_shot_samples']} samples)")
