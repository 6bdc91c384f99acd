"""The real-data quirks in a whole run: near-blank images and a boilerplate caption planted into a pool served on
loopback end as their own ledger rows, every input row once, also after a resume; duplicates still point at kept
rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline
from curate.stages.dedup_exact import DedupExactConfig
from curate.stages.dedup_phash import DedupPhashConfig
from curate.stages.hash import HashConfig
from curate.stages.rules import RulesConfig

BOILERPLATE = "Royalty free stock illustration, vector graphic"


@pytest.fixture(scope="module")
def quirky_list(demo_pool, fault_server, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The demo pool's URL list with 6 near-blank images added (transparent PNGs, a flat colour) and one caption
    put on 14 different clean pictures. Returns the list and, per URL, what was planted."""
    from curate.demo.pool import write_url_list

    root, items = demo_pool
    files = root / "files"
    planted: dict[str, str] = {}
    rows = []
    for i in range(6):
        name = f"blank_{i}.png"
        if i < 4:
            Image.new("RGBA", (150 + 10 * i, 120), (0, 0, 0, 0)).save(files / name)
        else:
            Image.new("RGB", (140, 140), (30 + 60 * i, 90, 160)).save(files / name)
        url = fault_server.url("img", name)
        rows.append({"url": url, "caption": "a red star on a white background", "kind": "near_blank"})
        planted[url] = "near_blank"
    listing = pq.read_table(write_url_list(items, fault_server.base_url,
                                           tmp_path_factory.mktemp("quirks") / "base.parquet")).to_pylist()
    clean = [row for row in listing if row["kind"] == "clean"]
    for row in clean[:14]:
        row["caption"] = BOILERPLATE
        planted[row["url"]] = "boilerplate"
    path = tmp_path_factory.mktemp("quirks") / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(listing + rows), path)
    return path, planted


def _pipeline(make_pipeline):
    config = make_pipeline()
    config.stages += [HashConfig(), RulesConfig(min_content_fraction=0.005, boilerplate_captions=True),
                      DedupExactConfig(), DedupPhashConfig()]
    return config


def test_near_blank_images_and_boilerplate_are_ledger_rows_once(quirky_list, make_pipeline, tmp_path) -> None:
    urls, planted = quirky_list
    out = tmp_path / "run"
    run_pipeline(_pipeline(make_pipeline), input_path=str(urls), output=out, local=True, progress=False)
    assert check_run(out) == []
    ledger = read_ledger(out).to_pylist()
    assert len(ledger) == pq.ParquetFile(urls).metadata.num_rows and len({r["uid"] for r in ledger}) == len(ledger)
    reason = {row["url"]: row["reason"] for row in ledger}
    for url, kind in planted.items():
        expected = "rule:low_information" if kind == "near_blank" else "rule:boilerplate_caption"
        assert reason[url] == expected, (url, kind, reason[url])
    others = Counter(r for url, r in reason.items() if url not in planted)
    assert not others["rule:low_information"] and not others["rule:boilerplate_caption"]  # nothing else
    status = {row["uid"]: row["status"] for row in ledger}
    for row in ledger:
        if (row["reason"] or "").startswith("dedup:"):
            assert status[row["duplicate_of"]] in ("kept", "filtered")
            assert row["duplicate_of"] != row["uid"]

    # a resume with the same pipeline changes nothing: the same rows, the same decisions
    run_pipeline(_pipeline(make_pipeline), input_path=str(urls), output=out, local=True, progress=False)
    again = read_ledger(out).to_pylist()
    assert check_run(out) == []
    assert sorted((r["uid"], r["status"], r["reason"]) for r in again) == \
        sorted((r["uid"], r["status"], r["reason"]) for r in ledger)
