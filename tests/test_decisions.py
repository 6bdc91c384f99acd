"""The decision half of the stage contract: a global stage returns Removals (rows, reasons, declared ledger columns,
would-reject counts); its declared columns reach the ledger, and the runner refuses undeclared ones instead of
dropping them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import StageConfig
from curate.core.decide import apply_decisions, decision_columns, run_global_stages
from curate.core.ledger import LedgerWriter, read_ledger
from curate.core.parts import write_part
from curate.core.stage import GlobalStage, Removals


class EveryOtherConfig(StageConfig):
    stage: Literal["every_other"] = "every_other"


class EveryOther(GlobalStage[EveryOtherConfig]):
    """Removes every other row (by uid order); a duplicate of the row before it."""

    name = "every_other"
    Config = EveryOtherConfig
    counts_would_reject = True
    extra_column = "duplicate_of"

    def inputs(self) -> list[str]:
        return ["caption"]

    def outputs(self) -> dict[str, pa.DataType]:
        return {self.extra_column: pa.string()}

    def decide(self, metadata: pa.Table) -> Removals:
        uids = sorted(metadata.column("uid").to_pylist())
        return Removals.of(uids[1::2], "rule:every_other", would_reject={"rule:every_other": len(uids) // 2},
                           **{self.extra_column: uids[0::2][: len(uids[1::2])]})


class UndeclaredColumn(EveryOther):
    def outputs(self) -> dict[str, pa.DataType]:
        return {}


class NotALedgerColumn(EveryOther):
    extra_column = "neighbour"


class ClashingColumn(EveryOther):
    def outputs(self) -> dict[str, pa.DataType]:
        return {"duplicate_of": pa.int64()}


@pytest.fixture()
def parts(tmp_path: Path) -> list[Path]:
    n = 6
    write_part(pa.table({"uid": [f"u{i}" for i in range(n)], "row": list(range(n)), "status": ["ok"] * n,
                         "reason": pa.nulls(n, pa.string()), "decided_by": pa.nulls(n, pa.string()), "caption": ["c"] * n}), str(tmp_path / "parts"))
    return sorted((tmp_path / "parts").iterdir())


def test_removals_reach_the_decisions_with_their_declared_column_and_counts(parts: list[Path]) -> None:
    decisions, would_reject = run_global_stages(parts, [EveryOther(EveryOtherConfig())])
    assert len(decisions) == 3 and decisions.rows.tolist() == [1, 3, 5]
    assert decisions.by_uid(parts) == {"u1": ("filtered", "rule:every_other", "every_other", "u0"),
                         "u3": ("filtered", "rule:every_other", "every_other", "u2"),
                         "u5": ("filtered", "rule:every_other", "every_other", "u4")}
    assert would_reject == {"rule:every_other": 3}


def test_a_column_that_would_not_reach_the_ledger_is_refused(parts: list[Path]) -> None:
    with pytest.raises(RuntimeError, match="must reach the ledger"):
        run_global_stages(parts, [UndeclaredColumn(EveryOtherConfig())])


def test_a_declared_column_the_ledger_lacks_becomes_a_ledger_column(parts: list[Path], tmp_path: Path) -> None:
    stage = NotALedgerColumn(EveryOtherConfig())
    decisions, _ = run_global_stages(parts, [stage])
    columns = decision_columns([stage])
    ledger = LedgerWriter(tmp_path, columns)
    for part in parts:
        ledger.write(apply_decisions(pq.read_table(part), decisions, columns))
    ledger.close()
    table = read_ledger(tmp_path)
    assert table.column("neighbour").to_pylist() == [None, "u0", None, "u2", None, "u4"]
    assert table.column("decided_by").to_pylist() == [None, "every_other"] * 3
    assert table.column("duplicate_of").null_count == 6


def test_a_declared_column_of_another_type_than_the_ledgers_is_refused(parts: list[Path]) -> None:
    with pytest.raises(RuntimeError, match="'duplicate_of' \\(int64\\) clashes with the ledger's"):
        run_global_stages(parts, [ClashingColumn(EveryOtherConfig())])


def test_removing_a_row_that_is_not_live_is_refused() -> None:
    with pytest.raises(RuntimeError, match="not a live row"):
        Removals.of(["u1", "ghost"], "rule:x").with_rows({"u1": 1}, "probe")


def test_would_reject_defaults_to_the_removed_rows_by_reason() -> None:
    removals = Removals.of(["a", "b", "c"], ["rule:x", "rule:y", "rule:x"])
    assert removals.rejected_by_reason() == {"rule:x": 2, "rule:y": 1}
    assert removals.table.column("status").to_pylist() == ["filtered"] * 3
