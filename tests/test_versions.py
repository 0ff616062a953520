"""The declared dependency minimums are the tested ones, and an older library stops the import with a
message naming it."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement

from mambavlm import versions
from tests.conftest import ROOT


def declared_minimums() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimums = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert lower, f"{line}: every dependency declares the lowest version tested"
        minimums[requirement.name] = lower[0]
    return minimums


def test_pyproject_declares_the_minimums_the_import_checks() -> None:
    declared = declared_minimums()
    for name, minimum in versions.MINIMUM_VERSIONS.items():
        assert declared[name] == minimum, name
    assert declared["torch"] == "2.11.0" and declared["transformers"] == "5.17.0"


def test_an_older_library_fails_the_import_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"transformers": "4.46.0", "torch": "2.4.1+cu121"}
    real = versions.version
    monkeypatch.setattr(versions, "version", lambda name: installed.get(name) or real(name))
    with pytest.raises(ImportError) as err:
        versions.check_installed_versions()
    message = str(err.value)
    assert "torch 2.4.1+cu121 is installed; mambavlm needs torch>=2.11.0" in message
    assert "transformers 4.46.0 is installed; mambavlm needs transformers>=5.17.0" in message
    monkeypatch.setattr(versions, "version", lambda name: "5.17.0+local" if name == "transformers" else real(name))
    versions.check_installed_versions()  # a local build of the minimum is fine
