"""Concept filters: rows whose stored image embedding is close to a concept's prompts are filtered with that concept,
computed with the model that made the embeddings; both sides of the threshold, the first concept wins."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from curate.core import parts as part_store
from curate.errors import CurateError
from curate.models.clip import ClipSpec, load_clip
from curate.core.runner import build_stages, run_pipeline
from curate.stages.concepts import ConceptFilter, ConceptsConfig
from curate.stages.score import ScoreConfig

CONCEPTS = {"star": "a star", "ring": ["a ring", "a circle"]}


@pytest.fixture(scope="module")
def scored(url_list, make_pipeline, tiny_clip, tmp_path_factory, fault_server):
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    out = tmp_path_factory.mktemp("concepts") / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    table = pa.concat_tables([pq.read_table(p) for p in part_store.part_files(out)], promote_options="permissive")
    live = table.filter(pc.equal(table.column("status"), "ok")).select(["uid", "image_embedding", "clip_model"])
    return config, live


def _cosines(tiny_clip, live: pa.Table) -> dict[str, np.ndarray]:
    clip = load_clip(ClipSpec(str(tiny_clip)))
    images = np.asarray(live.column("image_embedding").to_pylist(), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    out = {}
    with torch.inference_mode():
        for name, prompts in CONCEPTS.items():
            texts = clip.model.encode_text(clip.tokenizer([prompts] if isinstance(prompts, str) else prompts),
                                           normalize=True).float().numpy()
            out[name] = (images @ texts.T).max(axis=1)
    return out


def test_rows_at_or_above_the_threshold_show_the_concept(scored, tiny_clip) -> None:
    config, live = scored
    cosines = _cosines(tiny_clip, live)
    threshold = float(np.median(cosines["star"]))
    stage = ConceptFilter(ConceptsConfig(concepts=CONCEPTS, threshold=threshold))
    stage.bind(build_stages(config)[0])
    decided = stage.decide(live)
    out = decided.table
    removed = dict(zip(out.column("uid").to_pylist(), out.column("reason").to_pylist()))
    uids = live.column("uid").to_pylist()
    for i, uid in enumerate(uids):
        star, ring = (cosines[n][i] >= threshold - 1e-3 for n in ("star", "ring"))
        clear_star, clear_ring = (cosines[n][i] >= threshold + 1e-3 for n in ("star", "ring"))
        if clear_star:
            assert removed.get(uid) == "concept:star"  # the first concept wins
        elif clear_ring and not star:
            assert removed.get(uid) == "concept:ring"
        elif not star and not ring:
            assert uid not in removed
    assert 0 < len(removed) < len(uids)
    assert decided.would_reject["concept:star"] >= sum(r == "concept:star" for r in removed.values())


def test_embeddings_of_another_model_are_refused(scored) -> None:
    _, live = scored
    stage = ConceptFilter(ConceptsConfig(concepts=CONCEPTS))
    other = live.set_column(2, "clip_model", pa.array(["ViT-B-32/laion2b_s34b_b79k"] * live.num_rows))
    with pytest.raises(CurateError, match="score and filter with the same pipeline"):
        stage.decide(other)


def test_the_decision_does_not_depend_on_how_the_pool_is_cut(scored) -> None:
    """Cosines are computed per group of parts (as tasks on Ray): four pieces decide as one table does."""
    from curate.core.pool import Pool

    config, live = scored
    stage = ConceptFilter(ConceptsConfig(concepts=CONCEPTS, threshold=0.0))
    stage.bind(build_stages(config)[0])
    whole = stage.decide_pool(Pool.from_table(live))
    cut = stage.decide_pool(Pool.from_table(live, pieces=4))
    assert 0 < whole.num_rows < live.num_rows
    assert cut.table.sort_by("uid").equals(whole.table.sort_by("uid")) and cut.would_reject == whole.would_reject
