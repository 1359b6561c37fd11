"""`sdkit download` and `sdkit library …` through the real entry point (in-process)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from conftest import kohya_lora
from hub_fakes import Blob, CivitaiFile, CivitaiVersion, FakeCivitai, FileHost
from sdkit.cli.hub_cmd import _RichProgress  # importing it also attaches the commands to `cli`
from cli_run import run_sdkit
from sdkit.hub import TransferOptions, download


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sdkit --quiet ARGS`."""
    return run_sdkit(capsys, "--quiet", *args)


def test_download_json_outcome(file_host: FileHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file_host.blobs["a.safetensors"] = Blob(b"a" * 5000, etag='"a"')
    code, out, err = run(capsys, "download", file_host.url("a.safetensors"), "-o", str(tmp_path), "--json")
    assert code == 0, err
    [outcome] = json.loads(out)
    assert outcome["path"] == str(tmp_path / "a.safetensors") and outcome["status"] == "downloaded"
    assert outcome["sha256"] == hashlib.sha256(b"a" * 5000).hexdigest()


def test_refusals_are_one_line_with_exit_1(fake_civitai: FakeCivitai, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake_civitai.add_model(7, "Locked", "LORA", [CivitaiVersion(
        70, 7, "v1", login_required=True, files=[CivitaiFile(700, "l.safetensors", b"x", primary=True)])])
    code, out, err = run(capsys, "download", "civitai:7", "-o", str(tmp_path))
    assert code == 1 and out == ""
    assert err.splitlines() == ["sdkit: error: civitai:7@70: HTTP 401: login required (set CIVITAI_TOKEN); "
                                "server says: Unauthorized: The creator of this asset requires you to "
                                "be logged in to download it"]
    code, _, err = run(capsys, "download", "ftp://example.org/x", "-o", str(tmp_path))
    assert code == 1 and err.startswith("sdkit: error: ftp://example.org/x: unrecognised source")


def test_rename_and_overwrite_together_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "download", "civitai:1", "--rename", "--overwrite")
    assert code == 2 and "exclude each other" in err


def test_library_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    library = tmp_path / "ComfyUI"
    lora = kohya_lora(tmp_path / "style.safetensors")
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert run(capsys, "library", "init", str(library), "--layout", "comfyui")[0] == 0

    code, out, err = run(capsys, "library", "add", str(lora), "--library", str(library), "--json")
    assert code == 0, err
    assert json.loads(out)[0]["path"] == "models/loras/style.safetensors"

    shutil.copy(lora, library / "models" / "loras" / "style copy.safetensors")
    code, out, _ = run(capsys, "library", "scan", str(library), "--json")
    assert (code, json.loads(out)["rehashed"], json.loads(out)["added"]) == (0, 1, 1)

    code, out, _ = run(capsys, "library", "ls", "--library", str(library), "--kind", "lora", "--json")
    assert sorted(e["path"] for e in json.loads(out)) == ["models/loras/style copy.safetensors",
                                                          "models/loras/style.safetensors"]
    code, out, _ = run(capsys, "library", "find", sha[:10], "--library", str(library), "--json")
    assert len(json.loads(out)) == 2
    code, out, _ = run(capsys, "library", "dupes", "--library", str(library), "--json")
    assert [len(group) for group in json.loads(out)] == [2]

    assert run(capsys, "library", "verify", "--library", str(library))[0] == 0
    (library / "models" / "loras" / "style copy.safetensors").write_bytes(b"changed")
    code, out, err = run(capsys, "library", "verify", "--library", str(library))
    assert code == 1 and "changed: models/loras/style copy.safetensors" in out
    assert err.strip() == "sdkit: error: 1 changed and 0 missing since they were indexed"


def test_lookup_command_prints_and_stores(fake_civitai: FakeCivitai, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    lora = kohya_lora(tmp_path / "mystery.safetensors", seed=9)
    fake_civitai.add_model(5, "Mystery", "LORA", [CivitaiVersion(
        50, 5, "v2", trained_words=["mystic"], base_model="SDXL 1.0",
        files=[CivitaiFile(500, "m.safetensors", lora.read_bytes(), primary=True)])])
    library = tmp_path / "webui"
    run(capsys, "library", "init", str(library), "--layout", "a1111")
    run(capsys, "library", "add", str(lora), "--library", str(library))
    code, out, err = run(capsys, "library", "lookup", str(library / "models" / "Lora" / "mystery.safetensors"))
    assert code == 0, err
    assert "Mystery — v2 (LORA, SDXL 1.0)" in out and "trigger words: mystic" in out
    code, out, _ = run(capsys, "library", "ls", "--library", str(library), "--json")
    assert json.loads(out)[0]["trigger_words"] == ["mystic"]


def test_progress_bar_follows_the_transfer(file_host: FileHost, tmp_path: Path,
                                           options: TransferOptions) -> None:
    file_host.blobs["bar.safetensors"] = Blob(b"b" * 200_000, etag='"b"', drop_at=[80_000])
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    options.progress = _RichProgress(console)
    download(file_host.url("bar.safetensors"), output=tmp_path, options=options)
    shown = screen.getvalue()
    assert "bar.safetensors" in shown and "200.0 kB" in shown  # drawn, then cleared (transient)
    assert options.progress.task is None
