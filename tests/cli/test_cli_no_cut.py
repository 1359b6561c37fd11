"""Nothing a user may copy is cut to fit the terminal: `hash` prints sha256sum's lines
(checkable with `sha256sum -c`), and every table folds a long path or hash onto the next
line instead of ending it in "…"."""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CLI = Path(__file__).resolve().parents[2] / "sdkit" / "cli"


def _sdkit(*args: str, columns: int = 50) -> str:
    result = subprocess.run([sys.executable, "-m", "sdkit", *args], capture_output=True, text=True, timeout=120,
                            env={"COLUMNS": str(columns), "PATH": "/usr/bin:/bin", "TERM": "dumb"})
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def _long_named_file(tmp_path: Path) -> Path:
    folder = tmp_path / "a-folder-name-long-enough-to-pass-any-column" / "and-one-more-level"
    folder.mkdir(parents=True)
    path = folder / "model-with-a-rather-long-file-name-v1.0.safetensors"
    save_file({"weight": torch.arange(12, dtype=torch.float32)}, str(path))
    return path


def test_hash_lines_are_what_sha256sum_checks(tmp_path):
    path = _long_named_file(tmp_path)
    lines = _sdkit("hash", "--sha256sum", str(path)).splitlines()
    assert lines == [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path}"]
    (tmp_path / "sums").write_text("\n".join(lines) + "\n")
    assert subprocess.run(["sha256sum", "-c", str(tmp_path / "sums")], capture_output=True).returncode == 0
    full = _sdkit("hash", str(path))
    assert lines[0] in full.splitlines() and "AutoV2 " in full


def test_a_narrow_table_folds_a_long_path_and_its_hash_whole(tmp_path):
    path = _long_named_file(tmp_path)
    library = tmp_path / "library"
    _sdkit("library", "init", str(library), "--layout", "comfyui")
    _sdkit("library", "add", str(path), "--library", str(library))
    output = _sdkit("library", "ls", "--library", str(library), columns=40)
    assert "…" not in output
    joined = re.sub(r"[\s│┃|]+", "", output)  # the cells' lines, borders and padding removed
    assert path.name in joined
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in joined


def test_every_table_in_the_cli_is_the_folding_one():
    offenders = []
    for path in sorted(CLI.glob("*.py")):
        if path.name == "tables.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.table":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
