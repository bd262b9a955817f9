"""The sandbox is a distribution of its own (sandbox/): unblock's wheel leaves it out, and its
own declares everything it imports."""

from __future__ import annotations

import ast
import fnmatch
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "sandbox"


def _project(pyproject: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads(pyproject.read_text())


def test_unblocks_wheel_leaves_the_sandbox_out() -> None:
    config = _project(ROOT / "pyproject.toml")
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(fnmatch.fnmatch("mosaic_sandbox", p) for p in include), include
    assert "mosaic_sandbox" not in config["tool"]["setuptools"].get("package-data", {})
    assert not (ROOT / "mosaic_sandbox").exists(), "a top-level copy would be found by -m"
    extras = config["project"]["optional-dependencies"]
    named = {canonicalize_name(Requirement(r).name) for reqs in extras.values() for r in reqs}
    # Never a name to fetch from an index: make install installs ./sandbox itself.
    assert canonicalize_name(_project(SANDBOX / "pyproject.toml")["project"]["name"]) not in named


def test_the_sandbox_declares_what_it_imports_and_nothing_of_unblock() -> None:
    imported: set[str] = set()
    for source in (SANDBOX / "mosaic_sandbox").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "mosaic_sandbox"}
    assert "app" not in third_party, "the sandbox must not import the service"
    providers = packages_distributions()
    needed = {canonicalize_name(providers[module][0]) for module in third_party}
    project = _project(SANDBOX / "pyproject.toml")["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert needed <= declared, f"imported but not declared: {sorted(needed - declared)}"
    assert needed, "no third-party import found: the scan is broken"


def test_the_sandbox_distribution_ships_its_licence_and_types() -> None:
    project = _project(SANDBOX / "pyproject.toml")
    assert project["project"]["license"] == "MIT"
    for name in project["project"]["license-files"]:
        assert (SANDBOX / name).read_text() == (ROOT / "LICENSE").read_text()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["mosaic_sandbox"]
    assert (SANDBOX / "mosaic_sandbox" / "py.typed").is_file()
