"""Concept balancing (MetaCLIP): an entry matched by more than t rows keeps about t of them, rare entries keep
every row, a row is kept if any of its entries keeps it, draws repeat across reruns, and decisions reach the
ledger with the entries that were over-represented."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.cli import main
from curate.core.ledger import check_run, read_ledger
from curate.core.redecide import redecide
from curate.core.pool import Pool
from curate.core.runner import run_pipeline
from curate.errors import CurateError
from curate.report.html import write_report
from curate.stages.balance import BalanceConfig, BalanceFilter
from curate.stages.metadata_entries import build_matcher, matched_entries, read_entries, wordnet_nouns
from curate.stages.pool_ngrams import PoolNgrams, caption_ngrams, pool_ngram_entries


@pytest.fixture
def entries_file(tmp_path: Path) -> Path:
    path = tmp_path / "entries.txt"
    path.write_text("Dog\ncat\nbird\n\n  ice   cream \nThe\nx\n")  # a function word and a letter: never entries
    return path


def pool_of(captions: list[str]) -> Pool:
    n = len(captions)
    return Pool.from_table(pa.table({"uid": [f"{i:032x}" for i in range(n)], "row": pa.array(range(n), pa.int64()),
                                     "caption": captions}))


def test_entries_are_found_as_whole_words_plurals_included() -> None:
    matcher = build_matcher(["cat", "ice cream", "box", "category"])
    assert matched_entries(matcher, "Two CATS and a box of ice\tcream") == [0, 2, 1]
    assert matched_entries(matcher, "a catalogue category; boxes") == [3, 2]
    assert matched_entries(matcher, "concatenate") == [] and matched_entries(matcher, None) == []


def test_wordnet_noun_lemmas_are_read_from_index_noun(tmp_path: Path) -> None:
    (tmp_path / "index.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        "  2 Princeton University under the following license.\n"
        "ice_cream n 1 2 @ ~ 1 0 07614500  \n"
        "dog n 7 5 @ ~ #m #p %p 7 1 02084071 10114209 10023039 09886220 07676602 03907626 02712903  \n")
    assert wordnet_nouns(str(tmp_path)) == {"ice cream", "dog"}
    with pytest.raises(CurateError, match="wordnet-base"):
        wordnet_nouns(str(tmp_path / "missing"))


def test_entries_from_a_file_are_normalised(entries_file: Path) -> None:
    assert read_entries(str(entries_file), None) == ["bird", "cat", "dog", "ice cream"]


def test_the_head_is_sampled_down_to_t_and_the_tail_kept(entries_file: Path) -> None:
    captions = ["a dog in a park"] * 600 + ["a cat on a mat"] * 100 + ["a bird"] * 20 + ["a dog and a bird"] * 10 \
        + ["nothing we know"] * 30
    stage = BalanceFilter(BalanceConfig(entries=str(entries_file), max_per_entry=50))
    removed = stage.decide_pool(pool_of(captions))
    gone = set(removed.table.column("row").to_pylist())
    kept = Counter(c for i, c in enumerate(captions) if i not in gone)
    assert 30 <= kept["a dog in a park"] <= 70, kept  # ~600 x 50/610
    assert 30 <= kept["a cat on a mat"] <= 70, kept  # ~100 x 50/100
    assert kept["a bird"] == 20 and kept["a dog and a bird"] == 10  # bird: 30 rows <= t keeps them all
    assert kept["nothing we know"] == 0
    reasons = Counter(removed.table.column("reason").to_pylist())
    assert reasons["balance:no_entry"] == 30
    assert reasons["balance:over_represented"] == len(captions) - 30 - sum(kept.values())
    named = dict(zip(removed.table.column("row").to_pylist(), removed.table.column("balance_entries").to_pylist()))
    assert named[next(iter(gone - set(range(600, 1000))))] == "dog"
    # each entry a caption holds, with its live rows and the rows balancing kept ("ice cream": no caption holds it)
    assert stage.entry_table.to_pylist() == [
        {"entry": "bird", "rows": 30, "kept": 30}, {"entry": "cat", "rows": 100, "kept": kept["a cat on a mat"]},
        {"entry": "dog", "rows": 610, "kept": kept["a dog in a park"] + 10}]

    again = BalanceFilter(BalanceConfig(entries=str(entries_file), max_per_entry=50)).decide_pool(pool_of(captions))
    assert again.table.column("row").to_pylist() == removed.table.column("row").to_pylist()  # same draws
    other = BalanceFilter(BalanceConfig(entries=str(entries_file), max_per_entry=50, seed=1))
    assert other.decide_pool(pool_of(captions)).table.column("row").to_pylist() != \
        removed.table.column("row").to_pylist()
    keep = BalanceFilter(BalanceConfig(entries=str(entries_file), max_per_entry=50, no_entry="keep"))
    assert "balance:no_entry" not in keep.decide_pool(pool_of(captions)).table.column("reason").to_pylist()


def test_pool_ngrams_are_word_ngrams_without_function_word_edges() -> None:
    assert caption_ngrams("The Red fox, of 2019: red-fox!", 2) == {
        "red", "fox", "red fox"}  # "of", "the", "2019" and n-grams edged by them are not entries
    assert caption_ngrams("hot dog stand", 3) >= {"hot dog stand", "hot dog", "dog stand"}
    assert caption_ngrams("a cup of tea", 3) == {"cup", "tea", "cup of tea"}  # a function word inside is fine
    assert caption_ngrams(None, 2) == set()


def test_the_pools_frequent_ngrams_become_entries_and_flatten_the_head() -> None:
    captions = ["a golden retriever on grass"] * 300 + ["tabby cat sleeping"] * 100 + \
        [f"unique thing number {i}" for i in range(20)]
    pool = pool_of(captions)
    # "retriever on", "on grass": edged by a function word; "number 15", "15": edged by a number
    assert pool_ngram_entries(pool, PoolNgrams(min_rows=20)) == sorted([
        "golden", "retriever", "grass", "golden retriever", "tabby", "cat", "sleeping", "tabby cat", "cat sleeping",
        "unique", "thing", "number", "unique thing", "thing number"])
    assert pool_ngram_entries(pool, PoolNgrams(min_rows=20, max_entries=3)) == [
        "golden", "golden retriever", "grass"]  # the most frequent, ties by the n-gram
    assert pool_ngram_entries(pool, PoolNgrams(min_rows=101)) == ["golden", "golden retriever", "grass", "retriever"]

    stage = BalanceFilter(BalanceConfig(pool_ngrams={"min_rows": 20}, max_per_entry=25))
    removed = stage.decide_pool(pool)
    gone = set(removed.table.column("row").to_pylist())
    kept = Counter(c for i, c in enumerate(captions) if i not in gone)
    assert 40 < kept["a golden retriever on grass"] < 140 and 50 < kept["tabby cat sleeping"] < 95, kept
    assert sum(v for c, v in kept.items() if c.startswith("unique")) == 20  # 20 rows per entry <= t: all kept
    assert set(removed.table.column("reason").to_pylist()) == {"balance:over_represented"}


def test_a_balance_stage_needs_entries() -> None:
    with pytest.raises(ValidationError, match="needs metadata entries"):
        BalanceConfig()


def test_a_pipeline_balances_and_the_ledger_names_the_entries(url_list, make_pipeline, tmp_path, capsys) -> None:
    """The demo's captions name shapes and colours: 'circle' is common in them, the others rarer."""
    entries = tmp_path / "entries.txt"
    entries.write_text("circle\nsquare\ntriangle\nstar\n")
    config = make_pipeline()
    config.stages.append(BalanceConfig(entries=str(entries), max_per_entry=5, no_entry="keep"))
    out = tmp_path / "run"
    run_pipeline(config, input_path=str(url_list), output=out, local=True, progress=False)
    assert check_run(out) == []
    ledger = read_ledger(out).to_pylist()
    balanced = [r for r in ledger if r["reason"] == "balance:over_represented"]
    assert balanced and all(r["decided_by"] == "balance" and r["balance_entries"] for r in balanced)
    kept = Counter(e for r in ledger if r["status"] == "kept" for e in ("circle", "square", "triangle", "star")
                   if e in (r["caption"] or "").lower())
    assert all(count <= 15 for count in kept.values()), kept  # ~5 per entry, more where a row names two
    assert all(r["balance_entries"] is None for r in ledger if r["reason"] != "balance:over_represented")

    # the entries' counts are stored; `curate why` names a kept row's entries with them; the report plots them
    counts = {r["entry"]: r for r in pq.read_table(out / "decisions" / "balance_entries.parquet").to_pylist()}
    assert counts["circle"]["rows"] > 5 and 0 < counts["circle"]["kept"] < counts["circle"]["rows"]
    assert all(r["kept"] <= r["rows"] for r in counts.values())
    row = next(r for r in ledger if r["status"] == "kept" and "circle" in r["caption"].lower())
    assert main(["why", str(out), row["uid"]]) == 0
    circle = counts["circle"]
    assert f"[balance] entries: circle ({circle['rows']} rows, {circle['kept']} kept)" in capsys.readouterr().out
    page = write_report(out, tmp_path / "report.html").read_text()
    assert "<h2 id='balance'>Concept balance</h2><img" in page and f"<td>circle</td><td>{circle['rows']}</td>" in page

    # decisions taken again without balance leave no stale counts behind
    again = tmp_path / "again"
    redecide(config, out, again, local=True)
    assert (again / "decisions" / "balance_entries.parquet").exists()
    redecide(make_pipeline(), out, again, local=True)
    assert not (again / "decisions" / "balance_entries.parquet").exists()
    assert main(["why", str(again), row["uid"]]) == 0 and "[balance]" not in capsys.readouterr().out


def test_on_ray_the_tasks_decide_as_one_process_does(entries_file: Path, ray_session, tmp_path: Path) -> None:
    from curate.core.decide import run_global_stages
    from curate.core.fan_out import in_process
    from curate.core.parts import part_files, write_part

    captions = ["a dog"] * 300 + ["a cat"] * 40 + ["a bird and a dog"] * 20
    for start in range(0, len(captions), 60):  # six parts: six tasks
        rows = range(start, start + 60)
        write_part(pa.table({"uid": [f"{i:032x}" for i in rows], "row": pa.array(rows, pa.int64()),
                             "status": ["ok"] * 60, "reason": pa.nulls(60, pa.string()),
                             "decided_by": pa.nulls(60, pa.string()), "caption": captions[start:start + 60]}),
                   str(tmp_path / "parts"))
    stage = BalanceFilter(BalanceConfig(entries=str(entries_file), max_per_entry=30))
    on_ray, _ = run_global_stages(part_files(tmp_path), [stage])
    with in_process():
        here, _ = run_global_stages(part_files(tmp_path), [stage])
    assert on_ray == here and 250 <= len(here) <= 300
    # the pool's n-grams are counted by a shuffle across the six parts' tasks: the same entries as one process
    grams = BalanceFilter(BalanceConfig(pool_ngrams={"min_rows": 30}, max_per_entry=30))
    on_ray, _ = run_global_stages(part_files(tmp_path), [grams])
    ray_table = grams.entry_table
    with in_process():
        here, _ = run_global_stages(part_files(tmp_path), [grams])
    assert on_ray == here and ray_table.equals(grams.entry_table)
    assert grams.entry_table.column("entry").to_pylist() == ["cat", "dog"]  # "bird": 20 rows
