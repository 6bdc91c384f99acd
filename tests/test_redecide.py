"""`curate run --from-run OUT [--dry-run]`: new filters decided over a finished run's stored metadata — the dry run
writes nothing and agrees with the full run, which fetches nothing and reshards the kept samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curate.errors import CurateError
from curate.core.ledger import check_run, read_ledger, read_manifest
from curate.core.redecide import dry_run, redecide
from curate.core.runner import run_pipeline
from curate.stages.alignment import AlignmentConfig
from curate.stages.rules import RulesConfig
from curate.stages.score import ScoreConfig

REPO = Path(__file__).resolve().parents[1]


def _with_filters(make_pipeline, tiny_clip, min_words: int, keep_top: float):
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages += [RulesConfig(min_words=min_words, junk_captions=True), AlignmentConfig(keep_top=keep_top)]
    return config


@pytest.fixture(scope="module")
def finished(url_list, make_pipeline, tiny_clip, tmp_path_factory, fault_server) -> Path:
    out = tmp_path_factory.mktemp("redecide") / "run"
    run_pipeline(_with_filters(make_pipeline, tiny_clip, 1, 0.9), input_path=str(url_list), output=out, local=True,
                 progress=False)
    return out


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dry_run_writes_nothing_and_agrees_with_the_full_run(finished, make_pipeline, tiny_clip, fault_server,
                                                            tmp_path) -> None:
    stricter = _with_filters(make_pipeline, tiny_clip, 8, 0.5)
    before = _files(finished)
    requests = sum(fault_server.requests.values())
    preview = dry_run(stricter, finished)
    assert _files(finished) == before  # nothing written, nothing touched
    assert preview.totals_by_reason.get("rule:caption_too_short", 0) > 0
    assert preview.totals_by_status["kept"] < read_manifest(finished).totals_by_status["kept"]

    new = tmp_path / "stricter"
    published = redecide(stricter, finished, new, local=True)
    assert sum(fault_server.requests.values()) == requests  # nothing fetched
    assert check_run(new) == []
    assert published.totals_by_status == preview.totals_by_status
    assert published.totals_by_reason == preview.totals_by_reason
    assert published.would_reject == preview.would_reject
    # every filter counted on its own over the live pool: at least what it removed after the others
    for reason, count in published.would_reject.items():
        assert count >= published.totals_by_reason.get(reason, 0)
    assert published.would_reject["alignment:below_top_fraction"] >= published.totals_by_reason[
        "alignment:below_top_fraction"]
    assert _files(finished) == before  # the source run is left as it was
    kept_new = {r["uid"] for r in read_ledger(new).to_pylist() if r["status"] == "kept"}
    kept_old = {r["uid"] for r in read_ledger(finished).to_pylist() if r["status"] == "kept"}
    assert kept_new < kept_old


def test_only_global_stages_can_change(finished, make_pipeline, tiny_clip, tmp_path) -> None:
    other = _with_filters(make_pipeline, tiny_clip, 1, 0.9)
    other.stages[0].image_size = 64
    with pytest.raises(CurateError, match="only global stages"):
        dry_run(other, finished)
    with pytest.raises(CurateError, match="is the run decided from"):
        redecide(_with_filters(make_pipeline, tiny_clip, 1, 0.9), finished, finished)


def test_cli_dry_run_prints_the_new_funnel(finished, tiny_clip, tmp_path) -> None:
    raw = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    saved = yaml.safe_load((finished / "config.yaml").read_text())
    raw["input"], raw["stages"] = saved["input"], saved["stages"]
    raw["stages"][-2]["min_words"] = 8  # the rules stage
    pipeline = tmp_path / "stricter.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "curate.cli", "run", str(pipeline), "--from-run", str(finished),
                           "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dry run: nothing written" in done.stdout and "rule:caption_too_short" in done.stdout
    assert "each filter on its own would reject" in done.stdout
