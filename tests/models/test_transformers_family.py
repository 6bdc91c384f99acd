"""The transformers model family behind the scorer seam: CLIP and SigLIP folders score, filter concepts and evaluate
exactly as transformers computes them directly; unsafe or unsupported folders are refused before any work."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from curate.core import parts as part_store
from curate.core.runner import build_stages, run_pipeline
from curate.errors import CurateError
from curate.models.clip import ClipSpec
from curate.stages.caption import CaptionConfig
from curate.stages.concepts import ConceptFilter, ConceptsConfig
from curate.stages.score import ScoreConfig, ScoreStage
from curate.train.eval import evaluate, retrieval

KINDS = ("clip", "siglip")


def direct(folder: Path, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text embeddings as transformers' own model cards compute them."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    padding = "max_length" if model.config.model_type == "siglip" else True  # SigLIP was trained padded to 16
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    with torch.no_grad():
        image = model.get_image_features(**processor(images=pil, return_tensors="pt"))
        text = model.get_text_features(**processor.tokenizer(texts, padding=padding, truncation=True,
                                                             max_length=16 if padding == "max_length" else 77,
                                                             return_tensors="pt"))
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return (torch.nn.functional.normalize(image, dim=-1).numpy(), torch.nn.functional.normalize(text, dim=-1).numpy())


def batch(pairs: list[tuple[bytes, str]]) -> pa.Table:
    n = len(pairs)
    return pa.table({"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs],
                     "status": ["ok"] * n, "reason": pa.nulls(n, pa.string())})


@pytest.mark.parametrize("kind", KINDS)
def test_score_stage_equals_transformers_directly(kind, tiny_transformers, pool_images) -> None:
    folder = tiny_transformers[kind]
    pairs = pool_images[:12]
    stage = ScoreStage(ScoreConfig(model=str(folder), chunk_size=5))  # family auto: the folder's config.json
    stage.preflight()
    stage.setup()
    out = stage.process(batch(pairs))
    image, text = direct(folder, [b for b, _ in pairs], [c for _, c in pairs])
    assert out.column("status").to_pylist() == ["ok"] * 12
    assert np.abs(np.asarray(out.column("clip_score").to_pylist()) - (image * text).sum(axis=1)).max() < 1e-4
    stored = np.asarray(out.column("image_embedding").to_pylist(), dtype=np.float32)
    assert stored.shape == image.shape and np.abs(stored - image).max() < 2e-3  # float16 storage
    assert set(out.column("clip_model").to_pylist()) == {f"transformers:{folder.resolve()}"}


def test_specs_name_their_family(tiny_transformers, tiny_clip) -> None:
    folder = tiny_transformers["siglip"]
    assert ClipSpec(str(folder)).family == "transformers"
    stored = ClipSpec(f"transformers:{folder.resolve()}")  # as clip_model stores it
    assert (stored.family, stored.model) == ("transformers", str(folder.resolve()))
    assert ClipSpec(str(tiny_clip)).family == "open_clip"
    assert ClipSpec("ViT-B-32", "laion2b_s34b_b79k").family == "open_clip"
    hub = ScoreConfig(model="google/siglip-base-patch16-224", family="transformers").spec()
    assert (hub.family, hub.pretrained, hub.describe()) == ("transformers", None,
                                                            "transformers:google/siglip-base-patch16-224")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_unsafe_or_unsupported_folders_are_refused_at_validation(tiny_transformers, tmp_path) -> None:
    pickled = _copy(tiny_transformers["clip"], tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValidationError, match=r"no safetensors weights \(found: pytorch_model.bin\)"):
        ScoreConfig(model=str(pickled))

    other = _copy(tiny_transformers["siglip"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValidationError, match="model_type 'bert' is not an image-text embedding model"):
        ScoreConfig(model=str(other))

    with pytest.raises(ValidationError, match="unknown model family 'onnx'"):
        ScoreConfig(model=str(tiny_transformers["clip"]), family="onnx")
    with pytest.raises(ValidationError, match="itm: the image-text matching head is trained on open_clip"):
        ScoreConfig(model=str(tiny_transformers["clip"]), itm=True)
    with pytest.raises(ValidationError, match="pretrained and architecture_file are open_clip's"):
        ScoreConfig(model=str(tiny_transformers["clip"]), pretrained="openai")
    with pytest.raises(ValidationError, match="a hub id like 'org/name'"):
        ScoreConfig(model="not-a-hub-id", family="transformers")


def test_a_hub_id_that_is_not_cached_fails_in_the_driver(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # offline (conftest) and nothing cached
    stage = ScoreStage(ScoreConfig(model="google/siglip-base-patch16-224", family="transformers"))
    with pytest.raises(CurateError, match="google/siglip-base-patch16-224: cannot read its config"):
        stage.preflight()


@pytest.mark.parametrize("kind", KINDS)
def test_concept_prompts_are_encoded_by_the_model_that_embedded_the_images(kind, tiny_transformers) -> None:
    folder = tiny_transformers[kind]
    concepts = {"star": ["a star"], "ring": ["a ring", "a circle"]}
    stage = ConceptFilter(ConceptsConfig(concepts=concepts))
    encoded = stage.prompt_embeddings(f"transformers:{folder.resolve()}")
    for name, prompts in concepts.items():
        assert np.abs(encoded[name] - _direct_texts(folder, prompts)).max() < 1e-5


def _direct_texts(folder: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    siglip = model.config.model_type == "siglip"
    tokens = tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                       max_length=16 if siglip else 77, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**tokens)
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1).numpy()


def test_caption_best_scores_with_the_score_stages_family(tiny_transformers) -> None:
    score = ScoreConfig(model=str(tiny_transformers["siglip"]))
    caption = CaptionConfig(model="Salesforce/blip-image-captioning-base", mode="best")
    caption.resolve_with([score])
    assert caption.scorer is not None
    assert caption.scorer.spec().describe() == score.spec().describe()
    assert caption.scorer.family == "transformers"


def test_eval_ranks_with_the_transformers_embeddings(tiny_transformers, pool_images, tmp_path) -> None:
    folder = tiny_transformers["clip"]
    pairs = pool_images[:16]
    pq.write_table(pa.table({"image": [b for b, _ in pairs], "caption": [c for _, c in pairs]}),
                   tmp_path / "eval.parquet")
    results = evaluate(ClipSpec(str(folder)), str(tmp_path / "eval.parquet"))
    image, text = direct(folder, [b for b, _ in pairs], [c for _, c in pairs])
    expected = retrieval(image, text)
    assert results["model"] == f"transformers:{folder.resolve()}" and results["pairs"] == 16
    assert {k: results[k] for k in expected} == pytest.approx(expected)


def test_a_pipeline_scores_and_filters_concepts_with_a_siglip(url_list, make_pipeline, tiny_transformers,
                                                              tmp_path, fault_server) -> None:
    folder = tiny_transformers["siglip"]
    config = make_pipeline(score=ScoreConfig(model=str(folder)))
    config.stages.append(ConceptsConfig(concepts={"star": ["a star"]}, threshold=-0.99))  # every row shows it
    out = tmp_path / "run"
    manifest = run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False).manifest
    ledger = pq.read_table(out / "ledger.parquet")
    assert ledger.num_rows == manifest.input_rows == len(set(ledger.column("uid").to_pylist()))
    table = pa.concat_tables([pq.read_table(p, columns=["clip_model", "status"]) for p in part_store.part_files(out)])
    scored = table.filter(pc.is_valid(table.column("clip_model")))
    assert scored.num_rows > 0 and set(scored.column("clip_model").to_pylist()) == {f"transformers:{folder.resolve()}"}
    assert 0 < manifest.totals_by_reason.get("concept:star", 0) <= scored.num_rows
    assert manifest.totals_by_status["kept"] == 0
    assert build_stages(config)[1][-1].name == "concepts"
