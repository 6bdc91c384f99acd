"""`curate train` on curated shards: it learns, each objective's loss falls, checkpoints load everywhere, resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.cli import main
from curate.errors import CurateError
from curate.models.clip import BUNDLED_CONFIGS, ClipSpec, load_clip
from curate.train.config import load_train_config
from curate.train.eval import evaluate
from curate.train.loop import batch_stream, build_model, train


def config(shards: Path, out: Path, *sets: str):
    base = ["model=curate-tiny", "batch_size=32", "lr=1e-3", "warmup_steps=5", "log_every=1", "shuffle_buffer=200",
            f"data={shards}", f"output={out}"]
    return load_train_config(None, base + list(sets))


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(curated_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    result = train(config(curated_shards, out, "steps=150", "checkpoint_every=100", "objectives=[clip,itm]"),
                   progress=False)
    assert result.step == 150 and result.checkpoint == out / "checkpoints" / "step_00000150"
    return out


def test_a_few_hundred_steps_lift_retrieval_far_above_chance(trained, curated_shards) -> None:
    after = evaluate(ClipSpec(str(trained / "checkpoints" / "step_00000150")), str(curated_shards))
    before = evaluate(ClipSpec("curate-tiny"), str(curated_shards))
    chance = 5 / after["pairs"]
    assert after["image_to_text_R@5"] > max(6 * chance, before["image_to_text_R@5"] + 0.2)
    assert after["text_to_image_R@5"] > max(6 * chance, before["text_to_image_R@5"] + 0.2)


@pytest.mark.parametrize("objective, model, terms", [
    ("clip", "curate-tiny", ["clip_loss"]),
    ("siglip", "curate-tiny", ["siglip_loss"]),
    ("coca", "curate-tiny-coca", ["coca_contrastive_loss", "coca_caption_loss"]),
    ("clip,itm", "curate-tiny", ["clip_loss", "itm_loss"]),
])
def test_each_objective_trains_and_its_loss_falls(curated_shards, tmp_path, objective, model, terms) -> None:
    out = tmp_path / objective
    # CoCa decodes every caption token over the 49k vocabulary: half the batch keeps it under a minute on 2 CPUs
    batch = ["batch_size=16"] if objective == "coca" else []
    train(config(curated_shards, out, "steps=60", f"objectives=[{objective}]", f"model={model}", *batch),
          progress=False)
    records = logged(out)
    assert len(records) == 60 and set(records[0]) >= {*terms, "loss", "samples_per_second"}
    for term in terms:
        losses = [record[term] for record in records]
        print(f"{term}: first {np.mean(losses[:8]):.3f} last {np.mean(losses[-8:]):.3f}")
        assert np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8]), term


def test_coca_needs_a_coca_architecture(tmp_path) -> None:
    with pytest.raises(CurateError, match="coca needs a CoCa architecture"):
        load_train_config(None, ["objectives=[coca]", "model=curate-tiny"])
    with pytest.raises(CurateError, match="coca already has a contrastive term"):
        load_train_config(None, ["objectives=[coca, clip]", "model=curate-tiny-coca"])


def test_checkpoint_loads_in_open_clip_and_the_score_stage(trained, pool_images) -> None:
    import open_clip

    from curate.stages.score import ScoreConfig, ScoreStage

    folder = trained / "checkpoints" / "step_00000150"
    open_clip.add_model_config(BUNDLED_CONFIGS / "curate-tiny.json")
    by_path, _, preprocess = open_clip.create_model_and_transforms(
        "curate-tiny", pretrained=str(folder / "open_clip_model.safetensors"))
    by_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    image = torch.stack([preprocess(__import__("PIL.Image").Image.open(io.BytesIO(pool_images[0][0])).convert("RGB"))])
    with torch.no_grad():
        assert torch.allclose(by_path.eval().encode_image(image), by_dir.eval().encode_image(image), atol=1e-6)
    stage = ScoreStage(ScoreConfig(model=str(folder)))
    stage.preflight()
    stage.setup()
    import pyarrow as pa

    out = stage.process(pa.table({"image": [pool_images[0][0]], "caption": [pool_images[0][1]], "status": ["ok"],
                                  "reason": pa.nulls(1, pa.string())}))
    text = open_clip.get_tokenizer("curate-tiny")([pool_images[0][1]])
    with torch.no_grad():
        direct = float((by_dir.encode_image(image, normalize=True) * by_dir.encode_text(text, normalize=True)).sum())
    assert abs(out.column("clip_score")[0].as_py() - direct) < 1e-3
    meta = json.loads((folder / "open_clip_config.json").read_text())
    assert meta["curate"]["step"] == 150 and meta["curate"]["train_config"]["model"] == "curate-tiny"


def test_resume_continues_from_the_saved_step(curated_shards, tmp_path) -> None:
    out = tmp_path / "run"
    train(config(curated_shards, out, "steps=12", "checkpoint_every=6"), progress=False)
    result = train(config(curated_shards, out, "steps=20", "checkpoint_every=6"), progress=False)
    steps = [record["step"] for record in logged(out)]
    assert steps == list(range(1, 21))  # 1..12, then 13..20 after the resume: nothing redone, nothing skipped
    assert result.samples_seen == 20 * 32
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000018", "step_00000020"]
    again = train(config(curated_shards, out, "steps=20"), progress=False)  # finished: nothing to do
    assert again.step == 20 and [r["step"] for r in logged(out)] == steps


def test_a_fresh_coca_has_no_uninitialised_weights() -> None:
    """open_clip leaves CoCa's decoder projection as torch.empty; after memory full of NaN, ours is still finite."""
    for _ in range(5):
        poison = torch.full((8_000_000,), float("nan"))
        del poison
    model, _, _, _ = build_model(ClipSpec("curate-tiny-coca"), ["coca"], "cpu")
    assert [n for n, p in model.named_parameters() if not torch.isfinite(p).all()] == []
    assert float(model.text_decoder.text_projection.std()) > 0  # drawn, not zeros


@pytest.fixture
def one_torch_thread():
    """Threaded CPU reductions differ run to run, and Adam turns a near-zero gradient's noise into a full step.

    Earlier tests in the same process may have changed torch's thread count (a scoring stage run in-process sets it).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_interrupted_run_ends_with_the_weights_of_an_uninterrupted_one(
    curated_shards, tmp_path, one_torch_thread
) -> None:
    """clip + itm: the ITM head samples its negatives from torch's RNG, so the RNG must resume too."""
    from safetensors.torch import load_file

    sets = ("steps=10", "checkpoint_every=6", "keep_checkpoints=5", "objectives=[clip,itm]")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(config(curated_shards, straight, *sets), progress=False)
    train(config(curated_shards, broken, *sets), progress=False)
    # roll the second run back to its step-6 checkpoint, as if it had been killed before step 10
    shutil.rmtree(broken / "checkpoints" / "step_00000010")
    (broken / "latest.json").write_text(json.dumps({"step": 6, "checkpoint": "checkpoints/step_00000006"}))
    train(config(curated_shards, broken, *sets), progress=False)
    resumed = {r["step"]: r for r in logged(broken)[10:]}
    assert sorted(resumed) == [7, 8, 9, 10]
    for record in logged(straight)[6:]:
        for term in ("clip_loss", "itm_loss"):
            assert record[term] == pytest.approx(resumed[record["step"]][term], rel=1e-4), (record["step"], term)
    for name in ("open_clip_model.safetensors", "itm_head.safetensors"):
        a = load_file(straight / "checkpoints" / "step_00000010" / name)
        b = load_file(broken / "checkpoints" / "step_00000010" / name)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name


def test_resuming_with_other_objectives_is_one_clear_error(curated_shards, tmp_path) -> None:
    out = tmp_path / "run"
    train(config(curated_shards, out, "steps=2"), progress=False)
    with pytest.raises(CurateError, match=r"trained with \['clip'\], not \['clip', 'itm'\]"):
        train(config(curated_shards, out, "steps=4", "objectives=[clip,itm]"), progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_data_stream_continues_where_it_stopped(curated_shards, workers: int) -> None:
    """The batches after a checkpoint are the ones an uninterrupted run would have seen (captions compared), also
    with loader worker processes."""
    cfg = config(curated_shards, Path("/unused"), "batch_size=8", f"workers={workers}")
    _, preprocess, tokenizer, _ = build_model(ClipSpec("curate-tiny"), ["clip"], "cpu")
    urls = sorted(str(p) for p in curated_shards.glob("*.tar"))
    position = {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped": 0}
    stream = batch_stream(urls, preprocess, tokenizer, cfg, position)
    whole = [next(stream).texts for _ in range(16)]  # crosses into the second epoch
    saved = {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "skipped": 0}
    stream = batch_stream(urls, preprocess, tokenizer, cfg, saved)
    for _ in range(9):
        next(stream)
    resumed = batch_stream(urls, preprocess, tokenizer, cfg, dict(saved))
    rest = [next(resumed).texts for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[9:]))


def test_undecodable_samples_are_skipped_and_counted(curated_shards, tmp_path) -> None:
    bad = tmp_path / "shards"
    bad.mkdir()
    with tarfile.open(curated_shards / "00000.tar") as src, tarfile.open(bad / "00000.tar", "w") as dst:
        for i, member in enumerate(src):
            data = src.extractfile(member).read()
            if member.name.endswith(".jpg") and i % 9 == 0:
                data = b"\xff\xd8 not really a jpeg"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    result = train(config(bad, tmp_path / "run", "steps=3", "batch_size=8"), progress=False)
    assert result.step == 3 and result.skipped >= 1


def test_config_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["train", "--set", "objectives=[coca]", "--data", str(tmp_path)]) == 2
    assert "objectives" in capsys.readouterr().err
    path = tmp_path / "train.yaml"
    path.write_text("model: curate-tiny\nstepz: 10\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    with pytest.raises(CurateError, match="no .tar shards"):
        train(config(tmp_path, tmp_path / "out", "steps=1"), progress=False)


def test_cli_train_then_eval(curated_shards, tmp_path, capsys) -> None:
    assert main(["train", "--data", str(curated_shards), "--output", str(tmp_path / "run"), "--quiet",
                 "--set", "model=curate-tiny", "--set", "steps=3", "--set", "batch_size=16"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    results = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "run" / "checkpoints" / "step_00000003"), "--data",
                 str(curated_shards), "--json", str(results)]) == 0
    assert "image->text" in capsys.readouterr().out
    assert 0 <= json.loads(results.read_text())["image_to_text_R@10"] <= 1


def test_zero_shot_with_captions_as_classes_equals_recall_at_1(trained, demo_pool, tmp_path) -> None:
    """With each distinct caption as a class and "{}" as the template, zero-shot top-1 is image->text R@1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, items = demo_pool
    seen, rows = set(), []
    for item in items:
        if item.kind == "clean" and item.caption not in seen:
            seen.add(item.caption)
            rows.append({"image_path": str(root / "files" / item.name), "caption": item.caption, "label": item.caption})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval.parquet")
    spec = ClipSpec(str(trained / "checkpoints" / "step_00000150"))
    results = evaluate(spec, str(tmp_path / "eval.parquet"), classnames=[r["caption"] for r in rows], templates=["{}"])
    assert results["zero_shot_samples"] == len(rows)
    assert results["zero_shot_top1"] == pytest.approx(results["image_to_text_R@1"], abs=1e-9)


def test_itm_head_scores_matched_pairs_above_shuffled(trained, pool_images) -> None:
    """The fusion head trained on mined hard negatives is a second alignment score, through the score stage."""
    import pyarrow as pa

    from curate.stages.score import ScoreConfig, ScoreStage

    stage = ScoreStage(ScoreConfig(model=str(trained / "checkpoints" / "step_00000150"), itm=True))
    stage.preflight()
    stage.setup()
    captions = [c for _, c in pool_images]

    def scores(pairs):
        n = len(pairs)
        out = stage.process(pa.table({"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs],
                                      "status": ["ok"] * n, "reason": pa.nulls(n, pa.string())}))
        return np.asarray(out.column("itm_score").to_pylist())

    matched = scores(pool_images)
    shuffled = scores([(image, captions[(i + 7) % len(captions)]) for i, (image, _) in enumerate(pool_images)])
    assert ((0 <= matched) & (matched <= 1)).all()
    assert (matched[:, None] > shuffled[None, :]).mean() > 0.75  # ROC AUC of matched against shuffled


def test_itm_needs_a_folder_with_a_head(tiny_clip) -> None:
    from curate.stages.score import ScoreConfig, ScoreStage

    with pytest.raises(CurateError, match="has no image-text matching head"):
        ScoreStage(ScoreConfig(model=str(tiny_clip), itm=True)).preflight()


def test_eval_skips_and_counts_images_that_do_not_decode(trained, demo_pool, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, items = demo_pool
    clean = [item for item in items if item.kind == "clean"][:10]
    rows = [{"image": (root / "files" / item.name).read_bytes(), "caption": item.caption} for item in clean]
    rows.append({"image": b"<html>gone</html>", "caption": "a broken link"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval.parquet")
    results = evaluate(ClipSpec(str(trained / "checkpoints" / "step_00000150")), str(tmp_path / "eval.parquet"))
    assert results["pairs"] == 10 and results["undecodable"] == 1


def test_small_loss_clip_leaves_the_noisiest_pairs_out() -> None:
    """Three pairs that match and one whose caption is another picture's: with drop 0.25 the mismatched pair is
    the one left out of the loss (it still serves as a negative), with drop 0 the loss is open_clip's."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from curate.train.losses import small_loss_clip

    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 16), dim=-1)
    text = image + 0.05 * torch.randn(4, 16)
    text[3] = F.normalize(torch.randn(16), dim=-1)  # the noisy pair
    text = F.normalize(text, dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    labels = torch.arange(4)
    per_pair = (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    assert int(per_pair.argmax()) == 3
    assert torch.isclose(small_loss_clip(image, text, scale, 0.25), per_pair[:3].mean())
    assert torch.isclose(small_loss_clip(image, text, scale, 0.0), ClipLoss()(image, text, scale))


def test_drop_noisiest_needs_clip_in_one_process() -> None:
    from curate.train.config import TrainConfig

    with pytest.raises(ValueError, match="drop_noisiest"):
        TrainConfig(model="curate-tiny", objectives=["siglip"], drop_noisiest=0.3)
    with pytest.raises(ValueError, match="drop_noisiest"):
        TrainConfig(model="curate-tiny", drop_noisiest=0.3, distributed={"workers": 2})
    assert TrainConfig(model="curate-tiny", drop_noisiest=0.3).drop_noisiest == 0.3
