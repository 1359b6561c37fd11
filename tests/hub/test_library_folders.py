"""Model folders outside a library's root: ComfyUI's extra_model_paths.yaml and A1111's
`--ckpt-dir` / `--lora-dir` / … flags (webui-user.sh / .bat, or given to sdkit).

Expected paths are worked out here from ComfyUI's rules (utils/extra_config.py: base_path
expanded and taken relative to the yaml's folder, one path per line, paths without
base_path relative to the yaml's folder, is_default) and A1111's (paths_internal.py: the
COMMANDLINE_ARGS value split as a POSIX shell would).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_run import run_sdkit
from conftest import kohya_lora

from sdkit.errors import SdkitError
from sdkit.hub.library.folders import (
    ModelFolder,
    commandline_args,
    folders_from_webui_args,
    read_extra_model_paths,
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_sdkit(capsys, "--quiet", *args)


YAML = """\
comfyui:
    base_path: ../shared
    is_default: true
    checkpoints: models/checkpoints
    loras: |
        models/loras
        {absolute}
    custom_nodes: custom_nodes
other:
    vae: vae_here
    clip: /opt/clip
    unet: "models/unet\\n\\nmodels/unet2"
home:
    base_path: ~/sd
    embeddings: embeddings
empty:
"""


def test_extra_model_paths_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    absolute = tmp_path / "elsewhere" / "loras"
    (comfy / "extra_model_paths.yaml").write_text(YAML.format(absolute=absolute), encoding="utf-8")
    folders = read_extra_model_paths(comfy / "extra_model_paths.yaml")
    shared = os.path.normpath(comfy / ".." / "shared")
    expected = [
        ("checkpoint", f"{shared}/models/checkpoints", True), ("lora", f"{shared}/models/loras", True),
        ("lora", str(absolute), True),  # an absolute line ignores base_path, as os.path.join does
        ("vae", str(comfy / "vae_here"), False), ("text-encoder", "/opt/clip", False),
        ("unet", str(comfy / "models/unet"), False), ("unet", str(comfy / "models/unet2"), False),
        ("embedding", str(tmp_path / "home" / "sd" / "embeddings"), False),
    ]
    assert [(f.kind, str(f.path), f.is_default) for f in folders] == expected


@pytest.mark.parametrize("text", ["[1, 2]", "a: [x]", "a:\n  loras: [x, y]", "a: {b: c"])
def test_a_malformed_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "extra_model_paths.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(SdkitError, match="extra_model_paths.yaml"):
        read_extra_model_paths(tmp_path / "extra_model_paths.yaml")


def test_webui_user_command_lines(tmp_path: Path) -> None:
    sh = tmp_path / "webui-user.sh"
    sh.write_text('#!/bin/bash\n#export COMMANDLINE_ARGS=""\n'
                  "export COMMANDLINE_ARGS=\"--xformers --lora-dir '/mnt/my loras'\"  # mine\n"
                  'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --ckpt-dir=models2 \\\n  --vae-dir /v"\n',
                  encoding="utf-8")
    assert commandline_args(sh) == ["--xformers", "--lora-dir", "/mnt/my loras", "--ckpt-dir=models2",
                                    "--vae-dir", "/v"]
    bat = tmp_path / "webui-user.bat"
    bat.write_text('@echo off\r\nset COMMANDLINE_ARGS=\r\nset COMMANDLINE_ARGS=%COMMANDLINE_ARGS% ^\r\n'
                   ' --ckpt-dir "D:\\SD models" ^\r\n --embeddings-dir D:/emb\r\n'
                   "@REM set COMMANDLINE_ARGS=--vae-dir x\r\ncall webui.bat\r\n", encoding="utf-8")
    assert commandline_args(bat) == ["--ckpt-dir", "D:\\SD models", "--embeddings-dir", "D:/emb"]
    folders = folders_from_webui_args(commandline_args(sh), tmp_path, "webui-user.sh")
    assert folders == [ModelFolder("lora", Path("/mnt/my loras"), False, "webui-user.sh"),
                       ModelFolder("checkpoint", tmp_path / "models2", False, "webui-user.sh"),
                       ModelFolder("vae", Path("/v"), False, "webui-user.sh")]
    with pytest.raises(SdkitError, match="--lora-dir needs a folder"):
        folders_from_webui_args(["--lora-dir"], tmp_path)


def comfyui_root(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    for folder in ("checkpoints", "loras", "vae"):
        (root / "models" / folder).mkdir(parents=True)
    return root


def test_scan_reads_the_folders_of_comfyuis_yaml(tmp_path: Path, model_files: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = comfyui_root(tmp_path)
    shared = tmp_path / "shared"
    (shared / "loras").mkdir(parents=True)
    (root / "extra_model_paths.yaml").write_text("mine:\n  base_path: ../shared\n  loras: loras\n", encoding="utf-8")
    lora = kohya_lora(shared / "loras" / "outside.safetensors")
    shutil.copy(model_files["vae"], shared / "loras" / "a-vae.safetensors")

    code, out, err = run(capsys, "library", "scan", str(root), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["added"] == 2
    assert report["folders"] == [{"kind": "lora", "path": str(shared / "loras"), "is_default": False,
                                  "origin": "extra_model_paths.yaml"}]
    assert report["misplaced"] == [{"path": (shared / "loras" / "a-vae.safetensors").as_posix(),
                                    "kind": "vae", "folder": "models/vae"}]
    code, out, _ = run(capsys, "library", "ls", "--library", str(root), "--kind", "lora", "--json")
    assert [e["path"] for e in json.loads(out)] == [lora.as_posix()]


def test_an_is_default_folder_takes_new_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = comfyui_root(tmp_path)
    (root / "extra_model_paths.yaml").write_text(
        f"big:\n  base_path: {tmp_path / 'disk'}\n  is_default: true\n  loras: loras\n", encoding="utf-8")
    lora = kohya_lora(tmp_path / "new.safetensors")
    code, out, err = run(capsys, "library", "add", str(lora), "--library", str(root), "--json")
    assert code == 0, err
    placed = tmp_path / "disk" / "loras" / "new.safetensors"
    assert json.loads(out)[0]["path"] == placed.as_posix() and placed.is_file()


def test_folders_given_to_scan_are_remembered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "webui"
    assert run(capsys, "library", "init", str(root), "--layout", "a1111")[0] == 0
    (tmp_path / "loras").mkdir()
    kohya_lora(tmp_path / "loras" / "far.safetensors")
    code, out, err = run(capsys, "library", "scan", str(root), "--lora-dir", str(tmp_path / "loras"), "--json")
    assert code == 0, err
    assert json.loads(out)["added"] == 1
    kohya_lora(tmp_path / "loras" / "later.safetensors", seed=3)
    code, out, _ = run(capsys, "library", "scan", str(root), "--json")  # no flag this time
    assert json.loads(out)["added"] == 1 and json.loads(out)["removed"] == 0


def test_webui_user_sh_folders_are_scanned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "webui"
    assert run(capsys, "library", "init", str(root), "--layout", "a1111")[0] == 0
    (tmp_path / "my loras").mkdir()
    kohya_lora(tmp_path / "my loras" / "far.safetensors")
    (root / "webui-user.sh").write_text(f"export COMMANDLINE_ARGS=\"--lora-dir '{tmp_path / 'my loras'}'\"\n",
                                        encoding="utf-8")
    code, out, err = run(capsys, "library", "scan", str(root), "--json")
    assert code == 0, err
    assert json.loads(out)["added"] == 1
    assert json.loads(out)["folders"][0]["origin"] == "webui-user.sh"


def test_sample_finds_adapters_in_configured_folders(tmp_path: Path) -> None:
    from sdkit.runtime.sample.library import Library, resolve_file

    root = tmp_path / "webui"
    for folder in ("models/Stable-diffusion", "models/Lora", "models/VAE"):
        (root / folder).mkdir(parents=True)
    (tmp_path / "far" / "sdxl").mkdir(parents=True)
    far = kohya_lora(tmp_path / "far" / "sdxl" / "far-style.safetensors")
    (root / "webui-user.sh").write_text(f'export COMMANDLINE_ARGS="--lora-dir {tmp_path / "far"}"\n', encoding="utf-8")
    library = Library(root)
    assert resolve_file("far-style", "lora", library) == far
    assert resolve_file("sdxl/far-style", "lora", library) == far  # below the configured folder
    with pytest.raises(SdkitError, match=f"models/Lora, models/LyCORIS, models/loras, {tmp_path / 'far'}"):
        resolve_file("nothing", "lora", library)
