"""What `pip install sdkit` must bring: every package the code imports is a dependency,
not a test extra, and the project table builds without deprecation warnings."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _distribution_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            for requirement in requirements}


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for source in (ROOT / "sdkit").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"sdkit", "__future__"}


# imported only after a check that says what to install: an extra of their own
OPTIONAL = {"bitsandbytes": "adamw8bit"}


def test_every_imported_package_is_a_runtime_dependency():
    project = _project()
    declared = _distribution_names(project["dependencies"])
    for module, extra in OPTIONAL.items():
        assert module in _distribution_names(project["optional-dependencies"][extra])
        declared.add(module)
    owners = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        distributions = {name.lower().replace("_", "-") for name in owners.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported by sdkit but not in [project].dependencies: {missing}"


def test_the_license_is_an_spdx_string_and_the_build_backend_reads_it():
    project = _project()
    assert project["license"] == "MIT"  # a table is deprecated and warned about on every install
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    version = next(r for r in requires if r.startswith("setuptools"))
    assert int(re.search(r">=(\d+)", version)[1]) >= 77  # the first setuptools that reads SPDX strings
