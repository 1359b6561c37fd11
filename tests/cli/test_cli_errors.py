"""The command line's contract: one error line and exit 1 for bad input, JSON on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def run_sdkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdkit", *args],
                          capture_output=True, text=True, timeout=120)


def assert_clean_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sdkit: error: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [
    b"",                                   # empty file
    b"\x10\x00\x00\x00\x00\x00\x00\x00{",  # header longer than the file
    b"\x04\x00\x00\x00\x00\x00\x00\x00nope",  # not JSON
])
def test_malformed_safetensors_gives_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert_clean_error(run_sdkit("inspect", str(path)))


def test_missing_file_gives_one_line(tmp_path: Path) -> None:
    assert_clean_error(run_sdkit("inspect", str(tmp_path / "nothing.safetensors")))


def test_evil_pickle_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, path)
    result = run_sdkit("inspect", str(path))
    assert_clean_error(result)
    assert "system" in result.stderr
    assert not marker.exists()


def test_inspect_json_schema(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(path), metadata={"ss_network_module": "networks.lora"})
    result = run_sdkit("inspect", "--json", "--hash", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for field in ("path", "format", "kind", "family", "adapter_type", "components", "key_convention",
                  "tensors", "parameters", "dtypes", "size_bytes", "metadata", "notes", "hashes"):
        assert field in report
    assert report["format"] == "safetensors"
    assert report["kind"] == "lora"
    assert report["tensors"] == 3
    assert report["parameters"] == 4 * 8 * 2 + 1
    assert report["dtypes"] == {"F32": 3}
    assert report["metadata"] == {"ss_network_module": "networks.lora"}
    assert set(report["hashes"]) == {"sha256", "autov2", "legacy", "autov3"}
    assert report["hashes"]["autov2"] == report["hashes"]["sha256"][:10]


def test_inspect_png_prints_generation_parameters(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text = ("a red circle\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
            "Seed: 42, Size: 32x32, Model hash: 0123456789")
    info = PngInfo()
    info.add_text("parameters", text)
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    result = run_sdkit("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout)["parameters"]
    assert params["Prompt"] == "a red circle"
    assert params["Negative prompt"] == "blurry"
    assert params["Seed"] == "42"
    assert params["Model hash"] == "0123456789"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert_clean_error(run_sdkit("inspect", str(plain)))


def test_inspect_png_prints_a1111_prompt_syntax_literally(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    prompt = "a [cat:dog:0.5] photo, [/] <lora:fire:1> :smile:"
    negative = "[bold]blurry"
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nNegative prompt: {negative}\nSteps: 20, Seed: 1")
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    wide = {**os.environ, "COLUMNS": "400"}  # one table row per value
    result = subprocess.run([sys.executable, "-m", "sdkit", "inspect", str(path)], capture_output=True,
                            text=True, timeout=120, env=wide)
    assert result.returncode == 0, result.stderr
    assert prompt in result.stdout and negative in result.stdout
