"""The layering ARCHITECTURE.md promises, checked over every import in curate/ (lazy ones inside functions too):
stages never import the trainer or the CLI, the report reads a run's outputs only, models know nothing of
pipelines, config is data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "curate"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The curate modules a file imports: `from curate.core import parts` counts as curate.core.parts."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in the module itself
                found.add(node.module)
    return {m for m in found if m == "curate" or m.startswith("curate.")}


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# (who, may not import, why) and (who, may import only, why)
FORBIDDEN = [
    ("curate.stages", ("curate.train", "curate.cli", "curate.report"), "a stage is a unit of per-row or decision "
     "work: it never trains, parses arguments or prints reports"),
    ("curate.core", ("curate.cli", "curate.report"), "the spine runs pipelines; the CLI and the report sit on it"),
    ("curate.dedup", ("curate.stages", "curate.train", "curate.cli", "curate.report"),
     "the dedup algorithms work on arrays and the pool; stages call them, not the other way round"),
]
ALLOWED_ONLY = [
    ("curate.report", ("curate.report", "curate.errors", "curate.core.ledger", "curate.core.schema",
                       "curate.core.parts", "curate.core.atomic", "curate.stages.metadata_entries"),
     "the report reads a run's outputs (manifest, ledger, parts, shards), not the stage classes (it may match "
     "captions against a run's balance entries as the stage did)"),
    ("curate.models", ("curate.models", "curate.errors", "curate.core.atomic"),
     "models know nothing of pipelines, stages or training"),
    ("curate.config", ("curate.errors",), "config is data: binding stage names to classes is curate.core.pipeline's"),
]


def broken_rules() -> list[str]:
    broken = []
    for name, path in MODULES.items():
        imports = imported_modules(path) - {"curate"}
        for owner, forbidden, why in FORBIDDEN:
            if within(name, (owner,)):
                broken += [f"{name} imports {m}: {why}" for m in sorted(imports) if within(m, forbidden)]
        for owner, allowed, why in ALLOWED_ONLY:
            if within(name, (owner,)):
                broken += [f"{name} imports {m}: {why}" for m in sorted(imports) if not within(m, allowed)]
    return broken


def test_every_layering_rule_holds() -> None:
    assert broken_rules() == []


def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    users = [name for name, path in MODULES.items() if name != "curate.cli" and "curate.cli" in imported_modules(path)]
    assert users == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from curate.train.loop import train\n", "curate.train.loop"),
    ("def f():\n    from curate.core import parts as part_store\n", "curate.core.parts"),
    ("import curate.cli\n", "curate.cli"),
])
def test_the_checker_sees_every_import_form(tmp_path: Path, source: str, expected: str) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert expected in imported_modules(path)


def test_the_checker_reports_a_stage_that_imports_the_trainer(monkeypatch, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def setup():\n    from curate.train.loop import train\n")
    monkeypatch.setitem(MODULES, "curate.stages.probe", probe)
    assert broken_rules() == ["curate.stages.probe imports curate.train.loop: " + FORBIDDEN[0][2]]
