"""`sdkit -q`: a command that writes files prints nothing when it succeeds (no summary, no
notes), while --json output and the reports of reporting commands stay."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from cli_run import run_sdkit
from sdkit.cli.main import main

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
A = str(TOY / "sd1" / "toy-sd1.safetensors")
B = str(TOY / "sd1-b" / "toy-sd1-b.safetensors")
VAE = str(TOY / "sd1" / "toy-sd1.vae.safetensors")
PIPELINE = str(TOY / "sd1" / "diffusers")  # configs and tokenizer/ for embed add


run = run_sdkit


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    lora = folder / "b-minus-a.safetensors"
    main(["-q", "lora", "extract", B, A, "--rank", "2", "-o", str(lora)])
    embedding = folder / "style.safetensors"
    save_file({"emb_params": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(embedding))
    return {"lora": str(lora), "embedding": str(embedding)}


WRITING = {
    # the toy is stored in fp16: a cast to fp16 would only copy it, which convert refuses
    "convert": lambda i, out: ["convert", A, "-o", out, "--dtype", "bf16"],
    "merge": lambda i, out: ["merge", A, B, "--alpha", "0.5", "-o", out],
    "lora bake": lambda i, out: ["lora", "bake", A, f"{i['lora']}:0.5", "-o", out],
    "lora merge": lambda i, out: ["lora", "merge", i["lora"], f"{i['lora']}:0.5", "-o", out],
    "lora extract": lambda i, out: ["lora", "extract", B, A, "--rank", "2", "-o", out],
    "lora resize": lambda i, out: ["lora", "resize", i["lora"], "--rank", "1", "-o", out],
    "vae swap": lambda i, out: ["vae", "swap", A, VAE, "-o", out],
    "vae extract": lambda i, out: ["vae", "extract", A, "-o", out],
    "embed add": lambda i, out: ["embed", "add", A, f"{i['embedding']}:mystyle", "--to", "diffusers", "-o",
                                 out.removesuffix(".safetensors"), "--config", PIPELINE],
}


@pytest.mark.parametrize("command", sorted(WRITING))
def test_quiet_writing_commands_print_nothing(inputs: dict[str, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = run(capsys, "-q", *WRITING[command](inputs, str(tmp_path / "out.safetensors")))
    assert (code, out, err) == (0, "", "")
    assert [path.name for path in tmp_path.iterdir()] in (["out.safetensors"], ["out"])  # a file, or a folder


def test_without_quiet_the_summary_shows_and_json_stays_with_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "convert", A, "-o", str(tmp_path / "a.safetensors"), "--dtype", "bf16")
    assert code == 0 and "wrote" in out + err and "cast" in out + err
    code, out, err = run(capsys, "-q", "convert", A, "-o", str(tmp_path / "b.safetensors"), "--dtype", "bf16",
                         "--json")
    assert code == 0 and err == "" and json.loads(out)["tensors"] > 0


def test_quiet_reports_still_print(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "-q", "inspect", A)
    assert code == 0 and "sd1" in out
    code, out, _ = run(capsys, "-q", "hash", A)
    assert code == 0 and "AutoV2" in out


# ---- train and sample: the loops replaced by stand-ins (the command's printing is the subject)

def _trained(config: object, progress: object) -> SimpleNamespace:
    return SimpleNamespace(main_process=True, outputs=[Path("out.safetensors")], record=Path("out.train.json"),
                           loss_curve=Path("out.loss.png"), steps=3, resumed_from=None, precision="fp32",
                           losses=[0.5, 0.25], timings={}, notes=["training in fp32 on cpu"])


def test_quiet_train_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sdkit.runtime.train import loop

    monkeypatch.setattr(loop, "train", _trained)
    data = tmp_path / "pictures"
    data.mkdir()
    args = ["train", "lora", "--base", A, "--data", str(data), "-o", str(tmp_path / "out.safetensors")]
    code, out, err = run(capsys, *args)
    assert code == 0 and "trained lora for 3 steps" in out and "note: training in fp32" in err
    assert run(capsys, "-q", *args) == (0, "", "")
    code, out, err = run(capsys, "-q", *args, "--json")
    assert code == 0 and err == "" and json.loads(out)["steps"] == 3


def test_quiet_sample_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from sdkit.runtime.sample import run as sample_run

    output = tmp_path / "out.png"
    drawn = SimpleNamespace(outputs=[output], samples=[SimpleNamespace(seed=0, parameters="a cat")],
                            notes=["prompt cut at 77 tokens"], warnings=[])
    monkeypatch.setattr(sample_run, "run_sample", lambda job, out, **_: drawn)
    args = ["sample", A, "-p", "a cat", "-o", str(output)]
    code, out, err = run(capsys, *args)
    assert code == 0 and str(output) in out and "note: prompt cut" in err
    assert run(capsys, "-q", *args) == (0, "", "")
