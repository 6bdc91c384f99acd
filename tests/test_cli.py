"""The command line as people use it: the demo, inspect, and bad input that must fail in one line with nothing
published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.ledger import check_run

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "pipelines" / "demo.yaml")


def curate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_demo_curates_and_curated_training_beats_raw(tmp_path):
    """The whole demo: download with planted faults, bootstrapped scores, the alignment filter, then raw vs curated
    training at equal samples seen. Curation must pay on held-out retrieval."""
    import json

    out = tmp_path / "demo"
    done = curate("demo", "--n", "400", "--output", str(out), "--experiment-steps", "120",
                  "--set", "score.bootstrap.steps=80", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows in" in done.stdout and "download:http_404" in done.stdout and str(out / "run") in done.stdout
    assert " downloaded -> " in done.stdout and " decoded -> " in done.stdout and " kept" in done.stdout
    assert check_run(out / "run") == []

    misaligned = next(line for line in done.stdout.splitlines() if line.strip().startswith("misaligned"))
    removed_share = int(misaligned.split("(")[1].split("%")[0])
    assert removed_share >= 75, misaligned  # the filter finds the planted misaligned captions
    results = json.loads((out / "run" / "experiment" / "results.json").read_text())
    raw, curated = results["arms"]["raw"], results["arms"]["curated"]
    print(f"demo experiment: mean recall raw {raw['final']['mean_recall']:.3f}, "
          f"curated {curated['final']['mean_recall']:.3f}")
    assert curated["final"]["mean_recall"] > raw["final"]["mean_recall"]
    assert "curated wins on mean recall" in done.stdout
    assert raw["rows"] > curated["rows"]  # the same samples seen from fewer rows
    assert raw["log"][-1]["samples_seen"] == curated["log"][-1]["samples_seen"] == results["samples_seen"]
    assert (out / "run" / "experiment" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shown = curate("inspect", str(out / "run"), "--reason", "download:http_404", "--sample", "2", "--verify")
    assert shown.returncode == 0, shown.stderr
    assert "with download:http_404" in shown.stdout and "verify: ok" in shown.stdout
    missing = curate("inspect", str(out / "run"), "--reason", "download:nope")
    assert missing.returncode == 2 and "reasons present" in missing.stderr


@pytest.fixture
def urls(tmp_path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), path)
    return path


def _assert_one_line_failure(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curate: error:"), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_input_file(tmp_path):
    out = tmp_path / "out"
    _assert_one_line_failure(curate("run", DEMO, "--input", str(tmp_path / "nope.parquet"), "--output", str(out)),
                             "nope.parquet", "no such file")
    assert not out.exists()


def test_wrong_column_name(tmp_path, urls):
    out = tmp_path / "out"
    done = curate("run", DEMO, "--input", str(urls), "--output", str(out), "--set", "input.url_col=link")
    _assert_one_line_failure(done, "'link'", "input.url_col", "url, caption")
    assert not out.exists()


def test_malformed_yaml(tmp_path, urls):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - stage: download\n    timeout: [1,\n")
    _assert_one_line_failure(curate("run", str(bad), "--input", str(urls), "--output", str(tmp_path / "o")),
                             "bad.yaml:", "malformed YAML")


def test_unknown_stage(tmp_path, urls):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - stage: downlaod\n")
    _assert_one_line_failure(curate("validate", str(bad)), "stages[0].stage", "did you mean 'download'")


def test_unwritable_output(tmp_path, urls):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _assert_one_line_failure(curate("run", DEMO, "--input", str(urls), "--output", str(blocker / "out")),
                             "not writable")


def test_output_of_another_input_is_refused(tmp_path, urls):
    """Per-sample results of one input are never mixed with another's."""
    out = tmp_path / "out"
    first = curate("run", DEMO, "--input", str(urls), "--output", str(out), "--local", "--quiet",
                   "--set", "download.timeout=0.5", "--set", "download.retries=0")
    assert first.returncode == 0, first.stderr[-2000:]
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/b.jpg"], "caption": ["b"]}), other)
    _assert_one_line_failure(curate("run", DEMO, "--input", str(other), "--output", str(out), "--local",
                                    "--set", "download.timeout=0.5", "--set", "download.retries=0"),
                             "different input")
    changed = curate("run", DEMO, "--input", str(urls), "--output", str(out), "--local",
                     "--set", "download.timeout=0.5", "--set", "download.retries=0", "--set", "download.image_size=64")
    _assert_one_line_failure(changed, "different pipeline", "image_size")
    assert check_run(out) == []  # the refused runs left the finished output as it was


def test_refuses_a_folder_that_is_not_a_curate_output_and_inputs_inside_the_output(tmp_path, urls):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    _assert_one_line_failure(curate("run", DEMO, "--input", str(urls), "--output", str(busy)), "holds no curate run")
    assert (busy / "thesis.tex").read_text() == "precious"
    inside = tmp_path / "out" / "input"
    inside.mkdir(parents=True)
    (tmp_path / "out" / "config.yaml").write_text("name: x\n")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), inside / "urls.parquet")
    _assert_one_line_failure(curate("run", DEMO, "--input", str(inside / "urls.parquet"), "--output",
                                    str(tmp_path / "out")), "inside the output folder")
    assert (inside / "urls.parquet").exists()
    _assert_one_line_failure(curate("demo", "--n", "20", "--output", str(busy), "--download-only"), "not a curate demo")
