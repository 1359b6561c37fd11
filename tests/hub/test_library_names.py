"""Model, VAE and LoRA files given by their name in a library, wherever a command takes a
path; the reference for each run by name is the same command run with the path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_run import run_sdkit

from sdkit.cli.preflight import resolve_input
from sdkit.errors import SdkitError


@pytest.fixture
def library(tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "webui"
    assert run_sdkit(capsys, "library", "init", str(root), "--layout", "a1111")[0] == 0
    files = [str(model_files[kind]) for kind in ("checkpoint", "vae", "lora")]
    assert run_sdkit(capsys, "library", "add", *files, "--library", str(root))[0] == 0
    for folder in ("a", "b"):  # the same stem twice, in two subfolders
        (root / "models" / "Lora" / folder).mkdir()
        shutil.copy(model_files["lora"], root / "models" / "Lora" / folder / "style.safetensors")
    shutil.copy(model_files["vae"], root / "models" / "VAE" / "tiny-lora.safetensors")  # a VAE named like the LoRA
    assert run_sdkit(capsys, "library", "scan", str(root))[0] == 0
    return root


def test_inspect_by_name_is_inspect_by_path(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    by_path = run_sdkit(capsys, "inspect", str(library / "models" / "VAE" / "tiny-vae.safetensors"), "--json")
    by_name = run_sdkit(capsys, "--library", str(library), "inspect", "tiny-vae", "--json")
    assert by_name[0] == 0 and by_name == by_path
    assert json.loads(by_name[1])["kind"] == "vae"


def test_lora_check_by_names_from_the_environment(library: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base = library / "models" / "Stable-diffusion" / "tiny-checkpoint.safetensors"
    lora = library / "models" / "Lora" / "tiny-lora.safetensors"
    by_path = run_sdkit(capsys, "lora", "check", str(base), str(lora), "--json")
    monkeypatch.setenv("SDKIT_LIBRARY", str(library))
    # "tiny-lora" is a VAE's stem too: the LoRA argument takes the LoRA
    by_name = run_sdkit(capsys, "lora", "check", "tiny-checkpoint", "tiny-lora", "--json")
    assert by_name == by_path


def test_a_name_several_files_answer_to_is_refused_listing_them(library: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_sdkit(capsys, "--library", str(library), "lora", "check", "tiny-checkpoint", "style")
    assert (code, out) == (1, "")
    expected = (f"sdkit: error: style: 2 files in the library {library} have that name: "
                "models/Lora/a/style.safetensors, models/Lora/b/style.safetensors; give one of these paths")
    assert err.splitlines() == [expected]
    by_name = run_sdkit(capsys, "--library", str(library), "lora", "check", "tiny-checkpoint", "b/style", "--json")
    by_path = run_sdkit(capsys, "lora", "check", str(library / "models" / "Stable-diffusion" / "tiny-checkpoint.safetensors"),
                        str(library / "models" / "Lora" / "b" / "style.safetensors"), "--json")
    assert by_name == by_path


def test_resolution_rules(library: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lora = library / "models" / "Lora" / "tiny-lora.safetensors"
    vae_named_alike = library / "models" / "VAE" / "tiny-lora.safetensors"
    assert resolve_input("tiny-lora", ("lora",)) == "tiny-lora"  # no library configured: left as given
    monkeypatch.setenv("SDKIT_LIBRARY", str(library))
    assert resolve_input("tiny-lora:0.7", ("lora",), strength=True) == f"{lora}:0.7"
    assert resolve_input("TINY-LORA.safetensors", ("lora",)) == str(lora)  # file name, any case
    assert resolve_input("tiny-lora", ("vae",)) == str(vae_named_alike)
    with pytest.raises(SdkitError, match="2 files in the library"):
        resolve_input("tiny-lora")  # no kind to prefer
    assert resolve_input("models/Lora/a/style") == str(library / "models" / "Lora" / "a" / "style.safetensors")
    assert resolve_input("no-such-name") == "no-such-name"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-lora").write_bytes(b"x")
    assert resolve_input("tiny-lora", ("lora",)) == "tiny-lora"  # a file on disk comes first


def test_an_unknown_name_says_where_it_was_looked_for(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_sdkit(capsys, "--library", str(library), "vae", "swap", "tiny-checkpoint", "nothing",
                             "-o", str(library / "out.safetensors"))
    assert code == 1
    assert err.strip() == f"sdkit: error: nothing: no such file or directory, nor a file of that name in " \
                          f"the library {library}"
    assert not (library / "out.safetensors").exists()
