"""The score stage in-process: equal to open_clip computed directly, every way of naming a model, safe loading."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from curate.errors import CurateError
from curate.models.clip import BUNDLED_CONFIGS, ClipSpec, load_clip, save_checkpoint_dir
from curate.stages.score import ScoreConfig, ScoreStage
from curate.core.embeddings import embedding_matrix


def make_stage(**config) -> ScoreStage:
    stage = ScoreStage(ScoreConfig(**config))
    stage.preflight()
    stage.setup()
    return stage


def batch(pairs: list[tuple[bytes, str]]) -> pa.Table:
    n = len(pairs)
    return pa.table({"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs],
                     "status": ["ok"] * n, "reason": pa.nulls(n, pa.string())})


def direct_open_clip(folder: Path, pairs: list[tuple[bytes, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and normalised embeddings computed with open_clip alone, as its README does."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in pairs])
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(tokenizer([c for _, c in pairs]), normalize=True)
    return (image * text).sum(-1).numpy(), image.numpy(), text.numpy()


@pytest.fixture(scope="module")
def trained_clip(pool_images, tmp_path_factory) -> Path:
    """curate-tiny trained for 60 contrastive steps on the pool's matched (image, caption) pairs, saved as a folder."""
    import open_clip

    torch.manual_seed(0)
    config = BUNDLED_CONFIGS / "curate-tiny.json"
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("curate-tiny")
    tokenizer = open_clip.get_tokenizer("curate-tiny")
    images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in pool_images])
    texts = tokenizer([c for _, c in pool_images])
    loss_fn, optimizer = open_clip.ClipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        pick = torch.randperm(len(pool_images))[:32]
        image_features, text_features, logit_scale = model(images[pick], texts[pick])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint_dir(model, json.loads(config.read_text()), tmp_path_factory.mktemp("trained") / "clip")


def test_scores_and_embeddings_equal_open_clip_directly(tiny_clip, pool_images) -> None:
    pairs = pool_images[:20]
    out = make_stage(model=str(tiny_clip), chunk_size=7).process(batch(pairs))  # chunks that do not divide 20
    scores, image, text = direct_open_clip(tiny_clip, pairs)
    assert out.column("status").to_pylist() == ["ok"] * 20
    assert np.abs(np.asarray(out.column("clip_score").to_pylist()) - scores).max() < 1e-3
    assert np.abs(embedding_matrix(out.column("image_embedding")).astype(np.float32) - image).max() < 1e-3
    assert np.abs(embedding_matrix(out.column("text_embedding")).astype(np.float32) - text).max() < 1e-3
    assert set(out.column("clip_model").to_pylist()) == {f"local-dir:{tiny_clip.resolve()}"}


def test_trained_model_scores_matched_pairs_above_shuffled(trained_clip, pool_images) -> None:
    stage = make_stage(model=f"local-dir:{trained_clip}")
    captions = [c for _, c in pool_images]
    shuffled = [(image, captions[(i + 1) % len(captions)]) for i, (image, _) in enumerate(pool_images)]
    matched = np.asarray(stage.process(batch(pool_images)).column("clip_score").to_pylist())
    mismatched = np.asarray(stage.process(batch(shuffled)).column("clip_score").to_pylist())
    assert matched.mean() > mismatched.mean() + 0.3
    assert (matched > mismatched).mean() > 0.9


def test_untrained_model_does_not_separate_them(tiny_clip, pool_images) -> None:
    """The contrast above comes from training, not from the stage."""
    stage = make_stage(model=str(tiny_clip))
    captions = [c for _, c in pool_images]
    shuffled = [(image, captions[(i + 1) % len(captions)]) for i, (image, _) in enumerate(pool_images)]
    matched = np.asarray(stage.process(batch(pool_images)).column("clip_score").to_pylist())
    mismatched = np.asarray(stage.process(batch(shuffled)).column("clip_score").to_pylist())
    assert abs(matched.mean() - mismatched.mean()) < 0.1


def test_undecodable_image_fails_only_its_row(tiny_clip, pool_images) -> None:
    pairs = [pool_images[0], (b"<html>not an image</html>", "x"), (b"", "empty"), pool_images[1]]
    out = make_stage(model=str(tiny_clip), store_embeddings=False).process(batch(pairs))
    assert list(zip(out.column("status").to_pylist(), out.column("reason").to_pylist())) == [
        ("ok", None), ("failed", "score:bad_image"), ("failed", "score:bad_image"), ("ok", None)]
    assert "image_embedding" not in out.column_names


def test_architecture_name_with_weights_file(tiny_clip, pool_images, tmp_path) -> None:
    """An architecture (a bundled config) plus a plain state-dict .pt scores like the folder it came from."""
    from safetensors.torch import load_file

    weights = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(tiny_clip / "open_clip_model.safetensors")
                               .items()}}, weights)  # as open_clip's trainer saves under DDP
    by_name = make_stage(model="curate-tiny", pretrained=str(weights)).process(batch(pool_images[:5]))
    by_folder = make_stage(model=str(tiny_clip)).process(batch(pool_images[:5]))
    assert np.allclose(by_name.column("clip_score").to_pylist(), by_folder.column("clip_score").to_pylist(), atol=1e-5)
    assert by_name.column("clip_model")[0].as_py() == f"curate-tiny/{weights.resolve()}"


def test_custom_architecture_file(tmp_path, pool_images) -> None:
    arch = tmp_path / "my-clip.json"
    config = json.loads((BUNDLED_CONFIGS / "curate-tiny.json").read_text())
    config["embed_dim"] = 24
    arch.write_text(json.dumps(config))
    out = make_stage(model="my-clip", pretrained=None, architecture_file=str(arch)).process(batch(pool_images[:3]))
    assert embedding_matrix(out.column("image_embedding")).shape == (3, 24)


def test_hf_hub_id_loads_through_the_hub_client(tiny_clip, pool_images, tmp_path, monkeypatch) -> None:
    """hf-hub:org/repo resolves through huggingface_hub (offline here: from a cache laid out as the hub leaves it)."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--curate--tiny-clip" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clip, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_hub = make_stage(model="hf-hub:curate/tiny-clip").process(batch(pool_images[:4]))
    by_folder = make_stage(model=str(tiny_clip)).process(batch(pool_images[:4]))
    assert np.allclose(by_hub.column("clip_score").to_pylist(), by_folder.column("clip_score").to_pylist(), atol=1e-6)
    assert by_hub.column("clip_model")[0].as_py() == "hf-hub:curate/tiny-clip"


class Payload:
    """Stands for arbitrary code a pickle would run on load."""

    def __reduce__(self):
        return (print, ("this would have run",))


def test_pickle_payload_is_refused_with_a_clear_message(tiny_clip, tmp_path) -> None:
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": Payload()}, handle)
    torch_evil = tmp_path / "evil_torch.pt"
    torch.save({"state_dict": {}, "payload": Payload()}, torch_evil)
    for path in (evil, torch_evil):
        stage = ScoreStage(ScoreConfig(model="curate-tiny", pretrained=str(path)))
        with pytest.raises(CurateError, match="refusing to load a checkpoint that holds pickled objects"):
            stage.preflight()
        with pytest.raises(CurateError, match="refusing"):
            load_clip(ClipSpec("curate-tiny", str(path)))
    folder = tmp_path / "folder"
    shutil.copytree(tiny_clip, folder)
    (folder / "open_clip_model.safetensors").unlink()
    shutil.copy(torch_evil, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(CurateError, match="refusing"):
        ScoreStage(ScoreConfig(model=str(folder))).preflight()


@pytest.mark.parametrize("model, message", [
    ("ViT-B-23", "unknown architecture 'ViT-B-23'; closest known: ViT-B-32"),
    ("hf-hub:no-org", "an hf-hub id looks like 'hf-hub:org/repo'"),
    ("local-dir:/nonexistent/folder", "no open_clip_config.json in /nonexistent/folder"),
    ("/nonexistent/folder", "checkpoint folder /nonexistent/folder does not exist"),
])
def test_bad_model_specs_fail_validation_with_a_hint(model: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        ScoreConfig(model=model)


def test_unknown_pretrained_tag_names_the_known_ones() -> None:
    stage = ScoreStage(ScoreConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79"))
    with pytest.raises(CurateError, match="no pretrained tag 'laion2b_s34b_b79' for ViT-B-32; known: .*laion2b_s34b_b79k"):
        stage.preflight()


def test_gpus_without_cuda_is_a_clear_error(tiny_clip) -> None:
    stage = ScoreStage(ScoreConfig(model=str(tiny_clip), resources={"gpus": 0.5}))
    with pytest.raises(CurateError, match="sees no CUDA device"):
        stage.setup()


def test_missing_weights_file_fails_validation(tmp_path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        ScoreConfig(model="curate-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_pixels_come_from_the_stored_image(tiny_clip) -> None:
    """A PNG with alpha and a greyscale JPEG are scored (converted to RGB like open_clip's loaders do)."""
    rgba, grey = io.BytesIO(), io.BytesIO()
    Image.new("RGBA", (40, 30), (200, 10, 10, 128)).save(rgba, "PNG")
    Image.new("L", (40, 30), 90).save(grey, "JPEG")
    out = make_stage(model=str(tiny_clip)).process(batch([(rgba.getvalue(), "red"), (grey.getvalue(), "grey")]))
    assert out.column("status").to_pylist() == ["ok", "ok"]


def test_folder_whose_only_weights_open_clip_would_ignore_is_refused(tiny_clip, tmp_path) -> None:
    """open_clip's local-dir loader looks for .safetensors/.bin/.pth; a folder with only a .pt would load random."""
    folder = tmp_path / "pt-only"
    folder.mkdir()
    shutil.copy(tiny_clip / "open_clip_config.json", folder)
    torch.save({}, folder / "train_state.pt")
    with pytest.raises(ValidationError, match="no weights file"):
        ScoreConfig(model=str(folder))


def test_relative_paths_become_absolute_in_the_driver(tiny_clip, monkeypatch) -> None:
    monkeypatch.chdir(tiny_clip.parent)
    assert ScoreConfig(model=tiny_clip.name).model == str(tiny_clip.resolve())


def test_scoring_in_process_leaves_the_callers_torch_threads_alone(tiny_clip) -> None:
    """A driver, notebook or test that scores in-process keeps its own thread count; only a Ray worker is
    narrowed to the CPUs it declared (a 1-thread driver trains several times slower afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        make_stage(model=str(tiny_clip), resources={"cpus": 1})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
