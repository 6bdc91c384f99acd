"""`curate why` tells one row's story (its stages' columns, the decision, its duplicate, its place in the shard);
`curate diff` compares two runs of the same input."""

from __future__ import annotations

import pytest

from curate.cli import main
from curate.core.ledger import read_ledger
from curate.core.redecide import redecide
from curate.core.runner import run_pipeline
from curate.stages.dedup_exact import DedupExactConfig
from curate.stages.dedup_phash import DedupPhashConfig
from curate.stages.hash import HashConfig


def _config(make_pipeline, phash: bool):
    config = make_pipeline()
    config.stages += [HashConfig(), DedupExactConfig()] + ([DedupPhashConfig()] if phash else [])
    return config


@pytest.fixture(scope="module")
def runs(url_list, make_pipeline, tmp_path_factory, fault_server):
    root = tmp_path_factory.mktemp("report")
    run_pipeline(_config(make_pipeline, True), input_path=str(url_list), output=root / "a", local=True,
                 progress=False)
    redecide(_config(make_pipeline, False), root / "a", root / "b", local=True)
    return root / "a", root / "b"


def test_why_tells_a_kept_rows_story(runs, capsys) -> None:
    a, _ = runs
    kept = next(r for r in read_ledger(a).to_pylist() if r["status"] == "kept")
    assert main(["why", str(a), kept["uid"][:10]]) == 0
    text = capsys.readouterr().out
    assert kept["uid"] in text and "[download]" in text and "[hash]" in text and "phash=" in text
    assert "decision: kept" in text and f"in {kept['shard']} as {kept['key']} (sample " in text


def test_why_names_the_duplicate_and_the_deciding_stage(runs, capsys) -> None:
    a, _ = runs
    dup = next(r for r in read_ledger(a).to_pylist() if r["reason"] == "dedup:phash")
    assert main(["why", str(a), dup["url"]]) == 0
    text = capsys.readouterr().out
    assert "decision: filtered — dedup:phash (by dedup_phash)" in text
    assert f"duplicate of {dup['duplicate_of']} (kept" in text


def test_why_of_a_missing_row_is_one_clear_error(runs, capsys) -> None:
    a, _ = runs
    assert main(["why", str(a), "http://127.0.0.1:9/nope.jpg"]) == 2
    assert "no row with url" in capsys.readouterr().err


def test_diff_shows_counts_and_the_rows_only_one_run_keeps(runs, capsys) -> None:
    a, b = runs
    phash = sum(r["reason"] == "dedup:phash" for r in read_ledger(a).to_pylist())
    assert phash > 0
    assert main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.strip().startswith("dedup:phash"))
    assert line.split()[1:] == [str(phash), "0", f"-{phash}"]
    assert f"kept in B, not in A: {phash}" in text and "kept in A, not in B: 0" in text


# A fragment is never sent to the server, so these URLs download: their rows are kept, then printed by every command.
HOSTILE_FRAGMENTS = ["#\x1b]0;owned\x07", "#\x1b[2J\x1b[H", "#\rkept   00000.tar#0000  http://forged", "#\u202egpj.exe"]


@pytest.fixture(scope="module")
def hostile_runs(url_list, make_pipeline, tmp_path_factory, fault_server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.stages.rules import RulesConfig

    root = tmp_path_factory.mktemp("hostile_urls")
    table = pq.read_table(url_list)
    ok = [i for i, name in enumerate(table.column("url").to_pylist()) if name.endswith("/000000.jpg")
          or name.endswith("/000001.jpg") or name.endswith("/000002.jpg") or name.endswith("/000003.jpg")]
    table = table.take(ok or list(range(4)))
    urls = [u + f for u, f in zip(table.column("url").to_pylist(), HOSTILE_FRAGMENTS)]
    table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls))
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array(["a caption long enough to be cut by the rule in run B"] * table.num_rows))
    pq.write_table(table, root / "urls.parquet")
    run_pipeline(make_pipeline(), input_path=str(root / "urls.parquet"), output=root / "a", local=True, progress=False)
    config = make_pipeline()
    config.stages.append(RulesConfig(max_chars=20))
    redecide(config, root / "a", root / "b", local=True)
    return root / "a", root / "b", urls


def test_urls_are_printed_without_their_control_characters(hostile_runs, capsys) -> None:
    a, b, urls = hostile_runs
    kept = [r for r in read_ledger(a).to_pylist() if r["status"] == "kept"]
    assert {r["url"] for r in kept} >= set(urls[:3])  # the rows are real and kept: their URLs reach the printout
    outputs = {}
    for command in (["inspect", str(a), "--sample", "10"], ["why", str(a), next(r["uid"] for r in kept if r["url"] == urls[0])], ["diff", str(a), str(b)]):
        assert main(command) == 0
        outputs[command[0]] = capsys.readouterr().out
    for name, text in outputs.items():
        bad = sorted({hex(ord(c)) for c in text if c != "\n" and not c.isprintable()})
        assert bad == [], f"curate {name} printed {bad}"
    assert "\\x1b]0;owned\\x07" in outputs["inspect"] and "\\u202egpj.exe" in outputs["inspect"]  # shown, escaped
    assert "\\x1b" in outputs["diff"] and "\\x1b" in outputs["why"]
