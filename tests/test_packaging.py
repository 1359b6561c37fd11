"""What `pip install sdkit` must bring: every package the code imports is a dependency,
not a test extra, and the project table builds without deprecation warnings."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

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


def test_the_wheel_carries_the_clip_merges_and_their_licence(tmp_path):
    """The built wheel (and so any install) holds sdkit.data's files: single files need
    them to load offline."""
    import shutil
    import subprocess
    import zipfile

    source = tmp_path / "source"
    shutil.copytree(ROOT / "sdkit", source / "sdkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-c", "import setuptools.build_meta as b; b.build_wheel('dist')"],
                   cwd=source, check=True, capture_output=True)
    wheel = next((source / "dist").glob("sdkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sdkit/data/bpe_simple_vocab_16e6.txt.gz", "sdkit/data/CLIP-LICENSE.txt"} <= names
    packed = zipfile.ZipFile(wheel).read("sdkit/data/bpe_simple_vocab_16e6.txt.gz")
    assert packed == (ROOT / "sdkit" / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
