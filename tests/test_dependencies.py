"""Dependency floors that security promises rest on: urllib3's decompression limits on the download path, and
torch's `weights_only` loading behind "a checkpoint cannot run code". The declared floor and what is installed."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOORS = {"urllib3": "2.6.3", "torch": "2.10"}


def _requirements() -> dict[str, Requirement]:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, declared)}


@pytest.mark.parametrize("name, floor", FLOORS.items())
def test_declared_requirement_refuses_every_version_below_the_floor(name, floor) -> None:
    requirement = _requirements()[name]
    floor_version = Version(floor)
    below = [f"{floor_version.major}.{floor_version.minor - 1}.99", f"{floor}rc1", "2.0", "2.4.1"]
    for candidate in below:
        if Version(candidate) < floor_version:
            assert not requirement.specifier.contains(candidate, prereleases=True), f"{requirement} allows {candidate}"
    assert requirement.specifier.contains(floor), f"{requirement} refuses {floor} itself"


@pytest.mark.parametrize("name", FLOORS)
def test_installed_version_meets_the_declared_requirement(name) -> None:
    requirement = _requirements()[name]
    assert requirement.specifier.contains(version(name), prereleases=True), f"{name} {version(name)}: {requirement}"
