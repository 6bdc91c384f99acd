"""Download then score on the embedded Ray: embeddings published by uid, scores in each sample, survives a killed
actor, and a GPU request on a cluster without GPUs is refused before any work."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.core.embeddings import read_embeddings
from curate.errors import CurateError
from curate.core.ledger import check_run, read_ledger, read_manifest
from curate.core.runner import run_pipeline
from curate.stages.score import ScoreConfig


def score_config(tiny_clip, **resources) -> ScoreConfig:
    return ScoreConfig(model=str(tiny_clip), chunk_size=8,
                       resources={"cpus": 0.5, "batch_size": 16, "concurrency": 1, **resources})


def samples(out) -> dict[str, dict]:
    """uid -> {"image": bytes, "caption": str, "json": dict} read back from the published tars."""
    found: dict[str, dict] = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        members: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            image = next(v for k, v in parts.items() if k in ("jpg", "png", "webp"))
            found[meta["uid"]] = {"image": image, "caption": parts["txt"].decode(), "json": meta}
    return found


def test_scored_run_publishes_scores_and_embeddings_by_uid(ray_session, url_list, make_pipeline, tiny_clip,
                                                           tmp_path, fault_server):
    import open_clip

    out = tmp_path / "run"
    run_pipeline(make_pipeline(score=score_config(tiny_clip)), input_path=str(url_list), output=out, progress=False)
    assert check_run(out) == []
    ledger = read_ledger(out)
    kept = set(pa.compute.filter(ledger.column("uid"), pa.compute.equal(ledger.column("status"), "kept")).to_pylist())
    uids, image_vectors = read_embeddings(out)
    _, text_vectors = read_embeddings(out, "text_embedding")
    assert len(uids) == len(set(uids)) and set(uids) == kept  # every scored row once, nothing else
    assert read_manifest(out).embeddings == sorted(f"embeddings/{p.name}" for p in (out / "embeddings").iterdir())
    meta = pq.read_schema(out / read_manifest(out).embeddings[0]).metadata
    assert meta[b"model"].decode() == f"local-dir:{tiny_clip.resolve()}"

    # the stored vectors and the score in each sample's .json equal open_clip on the published image and caption
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip}")
    model.eval()
    published = samples(out)
    picks = sorted(published)[:12]
    images = torch.stack([preprocess(Image.open(io.BytesIO(published[u]["image"])).convert("RGB")) for u in picks])
    with torch.no_grad():
        image = model.encode_image(images, normalize=True).numpy()
        text = model.encode_text(tokenizer([published[u]["caption"] for u in picks]), normalize=True).numpy()
    row = {uid: i for i, uid in enumerate(uids)}
    for j, uid in enumerate(picks):
        assert np.abs(image_vectors[row[uid]].astype(np.float32) - image[j]).max() < 2e-3
        assert np.abs(text_vectors[row[uid]].astype(np.float32) - text[j]).max() < 2e-3
        assert abs(published[uid]["json"]["clip_score"] - float(image[j] @ text[j])) < 1e-3
        assert published[uid]["json"]["clip_model"] == f"local-dir:{tiny_clip.resolve()}"
        assert "image_embedding" not in published[uid]["json"]
    index = pq.read_table(next((out / "shards").glob("*.parquet")))
    assert "clip_score" in index.column_names and "image_embedding" not in index.column_names


def test_a_killed_score_actor_leaves_every_uid_scored_exactly_once(ray_session, demo_pool, fault_server,
                                                                   make_pipeline, tiny_clip, tmp_path):
    import psutil

    from curate.demo.pool import write_url_list

    _, items = demo_pool
    urls = write_url_list(items * 4, fault_server.base_url, tmp_path / "urls.parquet")  # 480 rows
    out = tmp_path / "run"
    config = make_pipeline("input.rows_per_chunk=40", score=score_config(tiny_clip, batch_size=4))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_pipeline(config, input_path=str(urls), output=out, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    runner = threading.Thread(target=run)
    runner.start()
    killed = None
    while runner.is_alive() and killed is None:
        if (out / "parts").exists() and any((out / "parts").glob("*.parquet")):  # batches stored: mid-run
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("ScoreStageWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed = proc.info["pid"]
                    break
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "the run ended before the score actor could be killed"
    assert not errors, errors
    assert check_run(out) == []
    ledger = read_ledger(out)
    assert ledger.num_rows == 480
    kept = pa.compute.filter(ledger.column("uid"), pa.compute.equal(ledger.column("status"), "kept")).to_pylist()
    uids, _ = read_embeddings(out)
    assert len(uids) == len(set(uids)) and set(uids) == set(kept)


def test_gpus_on_a_cluster_without_any_is_refused_before_work(ray_session, url_list, make_pipeline, tiny_clip,
                                                              tmp_path, fault_server):
    out = tmp_path / "run"
    with pytest.raises(CurateError, match="score asks for 1 GPU per worker but the cluster has 0 GPUs; set score.resources.gpus: 0"):
        run_pipeline(make_pipeline(score=score_config(tiny_clip, gpus=1)), input_path=str(url_list), output=out,
                     progress=False)
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())
