"""The HTML report opens in headless Chromium: its sections render, its script fills the ledger table, its images
are inline, and the browser logs no console message; a screenshot is saved next to it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from curate.cli import main
from curate.core.runner import run_pipeline
from curate.stages.alignment import AlignmentConfig
from curate.stages.dedup_exact import DedupExactConfig
from curate.stages.dedup_phash import DedupPhashConfig
from curate.stages.hash import HashConfig
from curate.stages.score import ScoreConfig

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "tests/run.sh installs Debian's chromium package"
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per start
    return subprocess.run([binary, *CHROMIUM, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


# Captions come from strangers: each of these, embedded raw in the page's JSON, ends or swallows its script.
HOSTILE_CAPTIONS = ["<!--<script", "</script><script>document.title='owned'</script>", "a & b <b>bold</b>"]


@pytest.fixture(scope="module")
def report(url_list, make_pipeline, tiny_clip, tmp_path_factory, fault_server) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("html")
    urls = pq.read_table(url_list)
    captions = urls.column("caption").to_pylist()
    captions[:len(HOSTILE_CAPTIONS)] = HOSTILE_CAPTIONS
    hostile_list = folder / "urls.parquet"
    pq.write_table(urls.set_column(urls.schema.get_field_index("caption"), "caption", pa.array(captions)), hostile_list)
    out = folder / "run"
    config = make_pipeline(score=ScoreConfig(model=str(tiny_clip)))
    config.stages.insert(1, HashConfig())
    config.stages += [DedupExactConfig(), DedupPhashConfig(), AlignmentConfig(keep_top=0.7)]
    run_pipeline(config, input_path=str(hostile_list), output=out, local=True, progress=False)
    path = out.parent / "report.html"
    assert main(["inspect", str(out), "--html", str(path)]) == 0
    return path


def test_report_renders_in_a_real_browser_without_console_errors(report, tmp_path) -> None:
    done = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    dom = done.stdout
    for section in ("funnel", "scores", "reasons", "near", "duplicates", "ledger"):
        assert f'id="{section}"' in dom, section
    ledger = dom.split('id="ledger-table"')[1].split("</table>")[0]
    assert ledger.count("<tr>") == 1 + 120  # the header, and every row of this run filled in by the script
    thumbnails = re.findall(r'src="data:image/jpeg;base64,', dom)
    charts = re.findall(r'src="data:image/png;base64,', dom)
    assert len(thumbnails) >= 20 and len(charts) >= 2  # inline: nothing to fetch
    assert "http" not in " ".join(re.findall(r'src="([^"]*)"', dom))
    assert "threshold" in dom and "kept" in dom
    assert "owned" not in dom.split("</title>")[0]  # no caption ran as script
    for caption in HOSTILE_CAPTIONS:  # each shows as text in the table the script filled
        assert f"<td>{html.escape(caption, quote=False)}</td>" in ledger, caption


def test_report_screenshot(report, tmp_path) -> None:
    shot = report.with_suffix(".png")
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("RGB").resize((64, 120)).getcolors(64 * 120)
    assert img.size == (1280, 2400) and len(colours) > 50  # charts and thumbnails drew, not a blank page
    print(f"screenshot: {shot}")
