"""`curate experiment` on a small finished run: the arms' data, equal samples seen, held-out rows in neither arm,
resume without retraining, and a restart when the run is re-decided. (Whether curation wins is the demo's test.)"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.core import parts as part_store
from curate.errors import CurateError
from curate.core.ledger import read_ledger
from curate.core.runner import run_pipeline
from curate.stages.alignment import AlignmentConfig
from curate.stages.score import ScoreConfig
from curate.train.experiment import ExperimentConfig, print_comparison, run_experiment


@pytest.fixture(scope="module")
def scored_run(url_list, make_pipeline, tiny_clip, tmp_path_factory) -> Path:
    """The demo pool scored by a tiny random CLIP and cut to its top half: kept ≠ downloaded."""
    out = tmp_path_factory.mktemp("experiment") / "run"
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages.append(AlignmentConfig(keep_top=0.5))
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    return out


def _uids(paths: list[Path]) -> list[str]:
    uids = []
    for path in paths:
        with tarfile.open(path) as tar:
            uids += [m.name.split(".")[0] for m in tar if m.name.endswith(".txt")]
    return uids


def _settings(**extra) -> ExperimentConfig:
    return ExperimentConfig(**{"steps": 6, "batch_size": 8, "eval_every": 3, "holdout": 0.2, "device": "cpu",
                               **extra})


def test_arms_see_equal_samples_and_never_the_held_out_rows(scored_run, capsys) -> None:
    results = run_experiment(scored_run, _settings(), progress=False)
    data = scored_run / "experiment" / "data"
    raw, curated, heldout = (_uids(sorted((data / name).glob("*.tar"))) for name in ("raw", "curated", "heldout"))
    assert len(raw) == len(set(raw)) and len(curated) == len(set(curated))  # each row once per arm

    ledger = read_ledger(scored_run)
    kept = set(ledger.filter(pc.equal(ledger.column("status"), "kept")).column("uid").to_pylist())
    stored = set()
    for part in part_store.part_files(scored_run):
        table = pq.read_table(part, columns=["uid", "image"])
        stored |= set(table.filter(pc.is_valid(table.column("image"))).column("uid").to_pylist())
    assert heldout and set(heldout) <= kept
    assert set(curated) == kept - set(heldout)
    assert set(raw) == stored - set(heldout)
    assert len(raw) > len(curated)

    arms = results["arms"]
    assert arms["raw"]["rows"] == len(raw) and arms["curated"]["rows"] == len(curated)
    for arm in arms.values():
        assert arm["log"][-1]["samples_seen"] == 6 * 8 == results["samples_seen"]
        assert [point["step"] for point in arm["curve"]] == [3, 6]  # evaluated at every checkpoint
        assert 0 <= arm["final"]["mean_recall"] <= 1
    assert results["eval"]["pairs"] == len(heldout)
    assert (scored_run / "experiment" / "curves.png").stat().st_size > 1000
    winner = print_comparison(results)
    printed = capsys.readouterr().out
    assert f"{winner} wins" in printed and "training rows" in printed

    # a rerun trains nothing again: the checkpoints are reused
    checkpoints = sorted((scored_run / "experiment" / "raw" / "checkpoints").glob("step_*"))
    stamps = [(c / "open_clip_model.safetensors").stat().st_mtime_ns for c in checkpoints]
    again = run_experiment(scored_run, _settings(), progress=False)
    assert [(c / "open_clip_model.safetensors").stat().st_mtime_ns for c in checkpoints] == stamps
    assert again["arms"]["raw"]["final"] == results["arms"]["raw"]["final"]

    # other settings start over instead of resuming a model trained under the old ones
    changed = run_experiment(scored_run, _settings(steps=3), progress=False)
    assert changed["arms"]["raw"]["log"][-1]["samples_seen"] == 3 * 8
    assert json.loads((scored_run / "experiment" / "experiment.json").read_text())["config"]["steps"] == 3


def test_refuses_what_cannot_be_compared(scored_run, tmp_path) -> None:
    with pytest.raises(CurateError, match="not a finished run"):
        run_experiment(tmp_path, _settings(), progress=False)
    with pytest.raises(CurateError, match="fewer than batch_size=4096"):
        run_experiment(scored_run, _settings(batch_size=4096), progress=False)


def test_compare_trains_one_arm_per_run_at_equal_samples_seen(scored_run, make_pipeline, tiny_clip, tmp_path,
                                                              capsys) -> None:
    """A second decision over the same stored rows (a stricter cut) is one more arm, in the same table."""
    from curate.cli import main
    from curate.core.redecide import redecide

    stricter = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    stricter.name = "stricter"
    stricter.stages.append(AlignmentConfig(keep_top=0.3))
    other = tmp_path / "stricter"
    redecide(stricter, scored_run, other, local=True)
    assert main(["experiment", str(scored_run), "--compare", str(other), "--steps", "6", "--batch-size", "8",
                 "--eval-every", "3", "--holdout", "0.2", "--device", "cpu", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "stricter" in shown and "gain over raw" in shown
    results = json.loads((scored_run / "experiment" / "results.json").read_text())
    assert list(results["arms"]) == ["raw", "curated", "stricter"]
    assert {arm["log"][-1]["samples_seen"] for arm in results["arms"].values()} == {6 * 8}
    kept = read_ledger(other).filter(pc.equal(read_ledger(other).column("status"), "kept")).num_rows
    assert results["arms"]["stricter"]["rows"] <= kept and \
        results["arms"]["stricter"]["rows"] < results["arms"]["curated"]["rows"]  # top 30%, not top half
    assert main(["experiment", str(scored_run), "--compare", str(tmp_path), "--quiet"]) == 2
    assert "not a finished run" in capsys.readouterr().err
