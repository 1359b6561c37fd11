"""A command refused for a path or an option that needs no model says so before it imports
torch or diffusers (which takes seconds to tens of seconds), in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "fixtures" / "toy" / "sd1" / "toy-sd1.safetensors")

# runs one command in a fresh interpreter and reports its exit code and what it imported
PROBE = """
import json, sys, time
from sdkit.cli.main import main
start = time.monotonic()
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "seconds": time.monotonic() - start,
                  "imported": [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]}))
"""

# (command with {M} model, {OUT} a fresh output in tmp, {MISSING} a folder that is not there,
#  {GONE} a file that is not there, {DATA} a folder, {EXISTING} a file that exists; exit code; message)
CASES = {
    "sample wrong suffix": ("sample {M} -p x -o {OUT}.jpg", 1, "the output must be a .png file"),
    "sample missing folder": ("sample {M} -p x -o {MISSING}/x.png", 1, "no such folder for the output"),
    "sample existing output": ("sample {M} -p x -o {EXISTING}", 1, "already exists"),
    "train missing folder": ("train lora --base {M} --data {DATA} -o {MISSING}/x.safetensors", 1,
                             "no such folder for the output"),
    "train wrong suffix": ("train lora --base {M} --data {DATA} -o {OUT}.bin", 1, "a lora output is .safetensors"),
    "train hypernet missing folder": ("train hypernet --base {M} --data {DATA} -o {MISSING}/x.pt", 1,
                                      "no such folder for the output"),
    "train missing base": ("train lora --base {GONE} --data {DATA} -o {OUT}.safetensors", 1,
                           "no such file or directory"),
    "verify missing adapter": ("verify {GONE} --base {M} --concept x --expect red", 1, "no such file or directory"),
    "convert missing folder": ("convert {M} -o {MISSING}/x.safetensors", 1, "no such folder for the output"),
    "convert parent is a file": ("convert {M} -o {EXISTING}/x.safetensors", 1, "no such folder for the output"),
    "convert exclusive options": ("convert {M} -o {OUT}.safetensors --clamp --allow-inf", 2, "exclude each other"),
    "convert missing input": ("convert {GONE} -o {OUT}.safetensors", 1, "no such file or directory"),
    "merge without output": ("merge {M} {M}", 2, "--output"),
    "merge wrong suffix": ("merge {M} {M} -o {OUT}.ckpt", 1, "the output's name must end in .safetensors or .sft"),
    "merge over an input": ("merge {M} {M} -o {M}", 1, "is one of the inputs"),
    "lora bake missing folder": ("lora bake {M} {M}:0.5 -o {MISSING}/x.safetensors", 1,
                                 "no such folder for the output"),
    "lora bake missing adapter": ("lora bake {M} {GONE}:0.5 -o {OUT}.safetensors", 1, "no such file or directory"),
    "lora bake exclusive options": ("lora bake {M} {M} -o {OUT}.safetensors --unet-only --te-only", 2,
                                    "exclude each other"),
    "lora merge missing input": ("lora merge {GONE} -o {OUT}.safetensors", 1, "no such file or directory"),
    "lora extract missing folder": ("lora extract {M} {M} -o {MISSING}/x.safetensors", 1,
                                    "no such folder for the output"),
    "lora resize existing output": ("lora resize {M} -o {EXISTING}", 1, "already exists"),
    "lora check missing adapter": ("lora check {M} {GONE}", 1, "no such file or directory"),
    "vae swap missing folder": ("vae swap {M} {M} -o {MISSING}/x.safetensors", 1, "no such folder for the output"),
    "vae extract wrong suffix": ("vae extract {M} -o {OUT}.ckpt", 1, "the output's name must end in .safetensors"),
    "vae check missing vae": ("vae check {M} {GONE}", 1, "no such file or directory"),
    "embed add missing folder": ("embed add {M} {M}:tok -o {MISSING}/x.safetensors", 1,
                                 "no such folder for the output"),
    "hypernet inspect missing file": ("hypernet inspect {GONE}", 1, "no such file or directory"),
}


def probe(args: list[str]) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "data").mkdir()
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    return {"M": MODEL, "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"),
            "GONE": str(tmp_path / "gone.safetensors"), "DATA": str(tmp_path / "data"), "EXISTING": str(existing)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_torch_is_imported(places: dict[str, str], case: str) -> None:
    command, code, message = CASES[case]
    report, stderr = probe([part.format(**places) for part in command.split()])
    assert report["code"] == code, stderr
    assert message in stderr, stderr
    if code == 1:
        assert stderr.startswith("sdkit: error: ") and stderr.count("\n") == 1, stderr
    assert report["imported"] == [], (case, report)
    assert report["seconds"] < 5, report  # no model library loads: a fraction of a second
    assert Path(places["EXISTING"]).read_bytes() == b"keep me"
    assert not Path(places["OUT"]).exists() and not list(Path(places["OUT"]).parent.glob("out*"))


def test_a_read_only_output_folder_is_refused_before_torch(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without the immutable attribute")
    try:
        report, stderr = probe(["merge", MODEL, MODEL, "-o", str(folder / "x.safetensors")])
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert report["code"] == 1 and report["imported"] == [], report
    assert stderr.startswith(f"sdkit: error: {folder}: cannot write there: "), stderr
    assert any(reason in stderr for reason in ("Permission denied", "Operation not permitted",
                                               "Read-only file system")), stderr
    assert list(folder.iterdir()) == []
