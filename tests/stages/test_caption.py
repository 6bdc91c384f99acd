"""Re-captioning with real transformers and open_clip code paths on tiny models built here: every mode, provenance in
the shards and the ledger, `best` never picks the lower-scoring caption, the ledger invariant through `rescue`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.core.pipeline import validate_pipeline
from curate.errors import CurateError
from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline
from curate.stages.alignment import AlignmentConfig
from curate.stages.caption import CaptionConfig
from curate.stages.score import ScoreConfig

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "green", "star", "circle",
         "square", "ring", "triangle", "on", "white", "black", "background", "photo", "of", "the", "picture", "small"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A random-init BLIP captioner (config + a tokenizer built from a word list), saved as safetensors."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}, bos_token="[DEC]")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(vision_config={**small, "image_size": 32, "patch_size": 8},
                        text_config={**small, "vocab_size": len(VOCAB), "max_position_embeddings": 64,
                                     "bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3},
                        projection_dim=32)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(folder / "model")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder / "model")
    return folder / "model"


GENERATE = {"max_new_tokens": 6, "min_new_tokens": 3, "num_beams": 1, "do_sample": False}


def _run(make_pipeline, url_list, out, *stages, score=None):
    config = make_pipeline(score=score)
    config.stages += list(stages)
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    assert check_run(out) == []
    return read_ledger(out).to_pylist()


def _samples(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False))


def test_replace_mode_writes_synthetic_captions_with_provenance(tiny_blip, make_pipeline, url_list, tmp_path) -> None:
    out = tmp_path / "run"
    ledger = _run(make_pipeline, url_list, out, CaptionConfig(model=str(tiny_blip), mode="replace",
                                                             prompt="a picture of", generation=GENERATE))
    inputs = dict(zip(*(pq.read_table(url_list).column(c).to_pylist() for c in ("url", "caption"))))
    kept = [row for row in ledger if row["status"] == "kept"]
    assert kept and all(row["caption_source"] == "synthetic" for row in kept)
    assert all(row["caption"] == inputs[row["url"]] for row in ledger)  # the ledger keeps the input's caption
    for sample in _samples(out):
        meta = json.loads(sample["json"])
        text = sample["txt"].decode()
        assert text == meta["synthetic_caption"] and text.startswith("a picture of") and len(text.split()) >= 4
        assert meta["original_caption"] == inputs[meta["url"]] and meta["caption_source"] == "synthetic"
        assert meta["caption_model"] == str(tiny_blip) and meta["caption_prompt"] == "a picture of"


def test_add_mode_keeps_both_captions(tiny_blip, make_pipeline, url_list, tmp_path) -> None:
    out = tmp_path / "run"
    _run(make_pipeline, url_list, out, CaptionConfig(model=str(tiny_blip), mode="add", generation=GENERATE))
    samples = _samples(out)
    assert samples and all("syn.txt" in s for s in samples)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["original_caption"] and meta["caption_source"] == "raw"
        assert sample["syn.txt"].decode() == meta["synthetic_caption"]


def test_best_never_picks_the_lower_scoring_caption(tiny_blip, tiny_clip, make_pipeline, url_list, tmp_path) -> None:
    out = tmp_path / "run"
    _run(make_pipeline, url_list, out, CaptionConfig(model=str(tiny_blip), mode="best", generation=GENERATE),
         score=ScoreConfig(model=str(tiny_clip)))
    sources = set()
    for sample in _samples(out):
        meta = json.loads(sample["json"])
        raw, syn = meta["raw_clip_score"], meta["synthetic_clip_score"]
        assert meta["clip_score"] == pytest.approx(max(raw, syn), abs=1e-6)
        chosen = meta["synthetic_caption"] if meta["caption_source"] == "synthetic" else meta["original_caption"]
        assert sample["txt"].decode() == chosen
        assert (meta["caption_source"] == "synthetic") == (syn > raw)
        sources.add(meta["caption_source"])
    print(f"best mode chose: {sources}")


def test_rescue_captions_only_low_rows_and_keeps_the_ledger_promise(tiny_blip, tiny_clip, make_pipeline, url_list,
                                                                   tmp_path) -> None:
    out = tmp_path / "probe"
    _run(make_pipeline, url_list, out, score=ScoreConfig(model=str(tiny_clip)))
    scores = sorted(s["clip_score"] for s in (json.loads(x["json"]) for x in _samples(out)))
    threshold = scores[len(scores) // 2]  # the median: half the rows fall below
    out = tmp_path / "run"
    ledger = _run(make_pipeline, url_list, out, CaptionConfig(model=str(tiny_blip), mode="rescue",
                                                             rescue_below=threshold, generation=GENERATE),
                  AlignmentConfig(min_score=threshold), score=ScoreConfig(model=str(tiny_clip)))
    assert len(ledger) == pq.read_metadata(url_list).num_rows
    for sample in _samples(out):
        meta = json.loads(sample["json"])
        assert meta["clip_score"] >= threshold  # kept: it passed, with its raw or its new caption
        if meta["raw_clip_score"] >= threshold:
            assert meta["synthetic_caption"] is None and meta["caption_model"] is None  # never captioned
    for row in ledger:  # provenance in the ledger too
        if row["caption_source"] == "synthetic":
            assert row["caption_model"] == str(tiny_blip) and row["synthetic_clip_score"] > row["raw_clip_score"]
    rescued = [r for r in ledger if r["status"] == "kept" and r["caption_source"] == "synthetic"]
    dropped = [r for r in ledger if r["reason"] == "alignment:below_min_score"]
    print(f"rescue at {threshold:.4f}: {len(rescued)} rows rescued, {len(dropped)} still below")


def test_an_open_clip_coca_from_the_bundled_trainer_captions(curated_shards, make_pipeline, url_list,
                                                              tmp_path) -> None:
    from curate.train.config import TrainConfig
    from curate.train.loop import train

    result = train(TrainConfig(model="curate-tiny-coca", objectives=["coca"], data=str(curated_shards),
                               output=str(tmp_path / "coca"), steps=3, batch_size=8, warmup_steps=1, device="cpu"),
                   progress=False)
    out = tmp_path / "run"
    _run(make_pipeline, url_list, out, CaptionConfig(model=str(result.checkpoint), mode="add",
                                                     generation={"max_new_tokens": 8, "num_beams": 1}))
    metas = [json.loads(s["json"]) for s in _samples(out)]
    assert metas and all(isinstance(m["synthetic_caption"], str) for m in metas)
    assert all(m["caption_model"] == f"local-dir:{result.checkpoint}" for m in metas)


def _pipeline(*stages: dict) -> dict:
    return {"name": "p", "input": {"path": "x.parquet"}, "output": {"path": "out"},
            "stages": [{"stage": "download"}, *stages]}


def test_caption_config_errors_are_one_line() -> None:
    with pytest.raises(CurateError, match="mode rescue: set rescue_below"):
        validate_pipeline(_pipeline({"stage": "score"}, {"stage": "caption", "model": "m", "mode": "rescue"}), "p.yaml")
    with pytest.raises(CurateError, match=r"stages\[1\] \(caption\): mode best compares CLIP scores"):
        validate_pipeline(_pipeline({"stage": "caption", "model": "m"}), "p.yaml")
    config = validate_pipeline(_pipeline({"stage": "score", "model": "ViT-B-32"},
                                         {"stage": "caption", "model": "m"}), "p.yaml")
    assert config.stages[2].scorer.model == "ViT-B-32"  # scored by the pipeline's own score stage


def test_weights_without_safetensors_are_refused(tiny_blip, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file
    import torch

    from curate.stages.caption import CaptionStage

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_blip, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    stage = CaptionStage(CaptionConfig(model=str(folder), mode="replace"))
    with pytest.raises(CurateError, match="safetensors"):
        stage.setup()
