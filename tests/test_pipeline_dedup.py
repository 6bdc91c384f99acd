"""Dedup in a pipeline: the demo pool's planted copies are removed by the tiers, each pointing at a row the ledger
keeps, and re-deciding with other tiers rewrites the decisions without refetching anything."""

from __future__ import annotations

from collections import Counter

import pytest

from curate.core.ledger import check_run, read_ledger
from curate.core.runner import run_pipeline
from curate.stages.dedup_exact import DedupExactConfig
from curate.stages.dedup_phash import DedupPhashConfig
from curate.stages.hash import HashConfig


def _dedup_pipeline(make_pipeline):
    config = make_pipeline()
    config.stages += [HashConfig(), DedupExactConfig(), DedupPhashConfig()]
    return config


@pytest.fixture(scope="module")
def dedup_run(url_list, make_pipeline, tmp_path_factory, fault_server):
    out = tmp_path_factory.mktemp("dedup") / "run"
    run_pipeline(_dedup_pipeline(make_pipeline), input_path=str(url_list), output=out, local=True, progress=False)
    return out


def test_planted_copies_are_removed_and_point_at_kept_rows(dedup_run, demo_pool) -> None:
    assert check_run(dedup_run) == []
    ledger = read_ledger(dedup_run).to_pylist()
    _, items = demo_pool
    kinds = Counter(item.kind for item in items)
    reasons = Counter(row["reason"] for row in ledger)
    print(f"planted: {kinds['exact_duplicate']} exact, {kinds['near_duplicate']} near; removed: "
          f"{reasons['dedup:exact']} exact, {reasons['dedup:phash']} phash")
    assert reasons["dedup:exact"] == kinds["exact_duplicate"]  # each copy, or its original, once
    assert kinds["near_duplicate"] * 0.8 <= reasons["dedup:phash"] <= kinds["near_duplicate"] + 1
    status = {row["uid"]: row["status"] for row in ledger}
    by_uid = {row["uid"]: row for row in ledger}
    for row in ledger:
        if (row["reason"] or "").startswith("dedup:"):
            target = row["duplicate_of"]
            while status[target] != "kept":  # an exact tier survivor may lose to a better copy in the pHash tier
                assert by_uid[target]["reason"].startswith("dedup:")
                target = by_uid[target]["duplicate_of"]
        else:
            assert row["duplicate_of"] is None


def test_dropping_a_tier_redecides_without_refetching(dedup_run, url_list, make_pipeline, fault_server) -> None:
    before = sum(fault_server.requests.values())
    kept_before = Counter(row["status"] for row in read_ledger(dedup_run).to_pylist())["kept"]
    phash_removed = Counter(row["reason"] for row in read_ledger(dedup_run).to_pylist())["dedup:phash"]
    config = _dedup_pipeline(make_pipeline)
    config.stages.pop()  # no pHash tier
    run_pipeline(config, input_path=str(url_list), output=dedup_run, local=True, progress=False)
    assert sum(fault_server.requests.values()) == before  # decided again from stored metadata only
    assert check_run(dedup_run) == []
    after = read_ledger(dedup_run).to_pylist()
    assert not any(row["reason"] == "dedup:phash" for row in after)
    assert Counter(row["status"] for row in after)["kept"] == kept_before + phash_removed
