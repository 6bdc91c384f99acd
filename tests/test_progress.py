"""The progress line: rows, rate, ETA, and each stage's busy time per row from the stored parts' timing columns."""

from __future__ import annotations

import pyarrow as pa

from curate.core.parts import batch_summary
from curate.core.runner import Progress, run_pipeline


def test_progress_line_names_each_stage_and_its_busy_time_per_row() -> None:
    progress = Progress("samples", 200, enabled=False)
    batch = pa.table({"uid": ["a", "b"], "download_seconds": [0.010, 0.030], "fetch_seconds": [5.0, 5.0],
                      "score_seconds": [0.1, 0.1]})
    progress.update(2, batch_summary(batch))
    line = progress.line(progress.start + 1.0)
    assert line.startswith("[samples] 2/200 rows, 2 rows/s, eta 99s")
    assert "busy per row: download 20.0 ms, score 100.0 ms" in line
    assert "fetch" not in line  # the fetch time is the download stage's own column, not a stage


def test_a_run_prints_per_stage_progress(url_list, make_pipeline, tmp_path, capsys) -> None:
    run_pipeline(make_pipeline(), input_path=str(url_list), output=tmp_path / "run", local=True, progress=True)
    err = capsys.readouterr().err
    assert "busy per row: download" in err and "rows/s, eta" in err
