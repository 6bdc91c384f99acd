"""`curate eval --suite DIR`: many eval sets in one call, in clip_benchmark's WebDataset layout, averaged the way
DataComp averages its 38 tasks.

Each folder of DIR that holds ``test/*.tar`` is one set:

    DIR/<set>/test/0.tar, 1.tar, ...          samples: an image (.jpg/.png/.webp) and .cls or .txt
    DIR/<set>/dataset_type.txt                 "retrieval", or "classification" (also when absent)
    DIR/<set>/classnames.txt                   classification: one class name per line, .cls indexes them
    DIR/<set>/zeroshot_classification_templates.txt   one prompt per line with {c} (default: "a photo of a {c}.")

A retrieval sample's .txt holds one caption per line; an image counts as found at K when any of its captions is
among the K nearest texts. A set's main figure is zero-shot top-1 accuracy (classification) or the mean of both
ways' recall@1 (retrieval); the suite's figure is the mean over sets.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.models.scorer import Scorer, load_scorer, preflight_model
from curate.train.data import IMAGE_KEYS
from curate.train.eval import KS

DEFAULT_TEMPLATE = "a photo of a {c}."


def suite_sets(folder: str | Path) -> list[Path]:
    """The eval sets of a suite folder, by name: the subfolders holding test/*.tar."""
    root = Path(folder).expanduser()
    sets = sorted(p for p in root.iterdir() if (p / "test").is_dir() and any((p / "test").glob("*.tar"))) \
        if root.is_dir() else []
    if not sets:
        raise CurateError(f"--suite {folder}: no eval sets (folders with test/*.tar, clip_benchmark's layout)")
    return sets


def read_set(folder: Path) -> dict[str, Any]:
    """One set's samples (image bytes with a label index or captions), its type, classes and templates."""
    kind_file = folder / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.exists() else "classification"
    if kind not in ("classification", "retrieval"):
        raise CurateError(f"{kind_file}: {kind!r}; curate evaluates classification and retrieval sets")
    samples = []
    for tar in sorted((folder / "test").glob("*.tar"), key=lambda p: (len(p.stem), p.stem)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as handle:
            for member in handle:
                if member.isfile():
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    members.setdefault(key, {})[ext.lower()] = handle.extractfile(member).read()  # type: ignore[union-attr]
        for key in sorted(members):
            sample = members[key]
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            target = sample.get("cls" if kind == "classification" else "txt")
            if image is not None and target is not None:
                samples.append({"image": image, "target": target.decode("utf-8", "replace").strip()})
    info: dict[str, Any] = {"name": folder.name, "kind": kind, "samples": samples}
    if kind == "classification":
        names = folder / "classnames.txt"
        if not names.exists():
            raise CurateError(f"{folder}: a classification set needs classnames.txt")
        info["classes"] = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        templates = folder / "zeroshot_classification_templates.txt"
        info["templates"] = [line.strip() for line in templates.read_text().splitlines() if line.strip()] \
            if templates.exists() else [DEFAULT_TEMPLATE]
    if len(samples) < 2:
        raise CurateError(f"{folder}: fewer than two samples with an image and a "
                          f"{'.cls' if kind == 'classification' else '.txt'}")
    return info


def multi_caption_retrieval(image: np.ndarray, text: np.ndarray, owner: np.ndarray,
                            ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K both ways when image i has several captions (``owner[j]`` is the image of caption j)."""
    similarity = image @ text.T
    order = np.argsort(-similarity, axis=1, kind="stable")  # texts, nearest first, per image
    first_hit = np.argmax(owner[order] == np.arange(len(image))[:, None], axis=1)
    captioned = np.isin(np.arange(len(image)), owner)  # an image without a caption has nothing to find
    text_rank = (similarity.T > similarity.T[np.arange(len(owner)), owner][:, None]).sum(axis=1)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((first_hit[captioned] < k).mean())
        metrics[f"text_to_image_R@{k}"] = float((text_rank < k).mean())
    return metrics


def evaluate_set(scorer: Scorer, info: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image

    pixels = []
    for sample in info["samples"]:
        with Image.open(io.BytesIO(sample["image"])) as img:
            pixels.append(scorer.preprocess(img.convert("RGB")))
    image = np.concatenate([scorer.embed_images(torch.stack(pixels[i:i + 256])) for i in range(0, len(pixels), 256)])
    result: dict[str, Any] = {"set": info["name"], "kind": info["kind"], "samples": len(info["samples"])}
    if info["kind"] == "retrieval":
        captions = [(i, line) for i, s in enumerate(info["samples"]) for line in s["target"].splitlines() if line]
        text = scorer.embed_texts([c for _, c in captions])
        metrics = multi_caption_retrieval(image, text, np.asarray([i for i, _ in captions]))
        result.update(metrics, captions=len(captions),
                      main=(metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2)
        return result
    classes, templates = info["classes"], info["templates"]
    labels = np.asarray([int(s["target"]) for s in info["samples"]])
    if labels.min() < 0 or labels.max() >= len(classes):
        raise CurateError(f"{info['name']}: a .cls label is outside classnames.txt's {len(classes)} classes")
    prompts = scorer.embed_texts([t.replace("{c}", name) for name in classes for t in templates])
    per_class = prompts.reshape(len(classes), len(templates), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    ranked = np.argsort(-(image @ per_class.T), axis=1, kind="stable")
    result.update(top1=float((ranked[:, 0] == labels).mean()),
                  top5=float((ranked[:, :5] == labels[:, None]).any(axis=1).mean()), classes=len(classes))
    result["main"] = result["top1"]
    return result


def evaluate_suite(spec: ClipSpec, folder: str | Path, device: str = "cpu") -> dict[str, Any]:
    sets = [read_set(path) for path in suite_sets(folder)]  # every set checked before the model loads
    preflight_model(spec)
    scorer = load_scorer(spec, device)
    results = [evaluate_set(scorer, info) for info in sets]
    return {"model": scorer.name, "suite": str(folder), "sets": results,
            "average": float(np.mean([r["main"] for r in results]))}


def print_suite(results: dict[str, Any]) -> None:
    print(f"{results['model']} on {len(results['sets'])} eval sets ({results['suite']})")
    print(f"{'set':24}{'kind':>16}{'samples':>9}{'main':>8}   (top-1 accuracy, or mean recall@1 both ways)")
    for r in results["sets"]:
        print(f"{r['set']:24}{r['kind']:>16}{r['samples']:>9}{r['main']:>8.3f}")
    print(f"{'average':24}{'':>16}{'':>9}{results['average']:>8.3f}")
