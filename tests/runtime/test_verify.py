"""`sdkit verify`: every adapter kind is sampled with and without, a plugged-in scorer
(a module of the current folder or a file) decides, and the exit code follows --min-rate
and --max-base-rate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdkit.cli.train_cmd  # noqa: F401  (attaches `train` and `verify` to the cli group)
from runtime_models import kohya_lora_tensors, write_adapter
from sdkit.adapters.hypernet import new_hypernetwork, save_hypernetwork
from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.train.verify import VerifyJob, as_labels, load_scorer, verify_adapter

SCORERS = '''
import numpy as np
calls = []

def always(picture):
    calls.append(np.asarray(picture))
    return ["purple", "circle"]

def never(picture):
    return []

def brightness(picture):
    return "bright" if np.asarray(picture).mean() > THRESHOLD else "dark"

THRESHOLD = 0.0

def broken(picture):
    return 3
'''


@pytest.fixture
def scorers(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import my_scorers

    return importlib.reload(my_scorers)


@pytest.fixture(scope="module")
def adapters(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    pipe = load_model(sd1.folder).pipe
    lora = write_adapter(folder / "style.safetensors", kohya_lora_tensors(pipe, seed=5))
    embedding = folder / "sks.safetensors"
    save_file({"emb_params": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(embedding))
    hypernet = save_hypernetwork(folder / "hn.pt", new_hypernetwork("hn", [32, 64]))
    tuned = load_file(str(sd1.file))
    for key in tuned:
        if key.startswith("model.diffusion_model.out."):  # the UNet's last layers, nudged
            tuned[key] = tuned[key] * 1.5
    save_file(tuned, str(folder / "tuned.safetensors"))
    shutil.copytree(sd1.file.with_name(sd1.file.name + ".tokenizer"), folder / "tuned.safetensors.tokenizer")
    return {"lora": lora, "embedding": embedding, "hypernetwork": hypernet, "checkpoint": sd1.file,
            "tuned": folder / "tuned.safetensors"}


def _job(adapter, base, **changes):
    settings = {"concept": "a photo of sks", "expect": "purple/circle", "seeds": 2, "steps": 3, "size": 32,
                "scorer": "my_scorers:always"}
    settings.update(changes)
    return VerifyJob(adapter, base, **settings)


@pytest.mark.parametrize("kind, adapter", [("lora", "lora"), ("embedding", "embedding"),
                                           ("hypernetwork", "hypernetwork"), ("checkpoint", "tuned")])
def test_every_adapter_kind_is_sampled_with_and_without(sd1, adapters, scorers, kind, adapter):
    result = verify_adapter(_job(adapters[adapter], sd1.file))
    assert result.kind == kind and result.expected == ["purple", "circle"]
    without, with_adapter = scorers.calls[:2], scorers.calls[2:]  # two seeds without, then with
    assert [picture.shape for picture in scorers.calls] == [(32, 32, 3)] * 4
    assert all(not np.array_equal(a, b) for a, b in zip(without, with_adapter))
    # a scorer that sees the concept everywhere sees it in the base too: no proof of the adapter
    assert (result.with_rate, result.without_rate, result.passed) == (1.0, 1.0, False)
    assert result.failures() == ["the base alone showed it in 100% of pictures, above --max-base-rate 0.2"]


def test_the_rate_is_the_fraction_of_seeds_showing_every_expected_label(sd1, adapters, scorers):
    from sdkit.runtime.sample.sampler import Sampler, Settings

    sampler = Sampler(load_model(sd1.file))
    settings = Settings(steps=3, cfg=7.0, seed=0, width=32, height=32, scheduler="ddim")
    images = [s.image for s in sampler.generate(sampler.plan_prompt("a photo of sks"), settings, 2)]
    means = sorted(float(scorers.np.asarray(image).mean()) for image in images)
    assert means[0] < means[1]
    scorers.THRESHOLD = sum(means) / 2  # exactly one of the two seeds reads "bright"
    result = verify_adapter(_job(adapters["checkpoint"], sd1.file, scorer="my_scorers:brightness", expect="bright"))
    assert (result.with_rate, result.without_rate, result.passed) == (0.5, 0.5, False)
    assert sorted(result.labels_without) == [["bright"], ["dark"]]
    both = verify_adapter(_job(adapters["checkpoint"], sd1.file, scorer="my_scorers:brightness",
                               expect="bright/dark"))
    assert both.with_rate == 0.0


def _verify_args(sd1, adapters, *extra):
    return ["verify", str(adapters["lora"]), "--base", str(sd1.file), "--concept", "a photo of sks",
            "--expect", "purple", "--seeds", "2", "--steps", "3", "--size", "32", *extra]


def test_cli_exit_code_follows_min_rate_and_max_base_rate(sd1, adapters, scorers, capsys):
    main(_verify_args(sd1, adapters, "--scorer", "my_scorers:always", "--max-base-rate", "1", "--json"))
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["with_rate"] == 1.0 and report["kind"] == "lora"
    assert report["max_base_rate"] == 1.0
    for scorer, why in (("never", "the concept showed in 0% of pictures with it, below --min-rate 0.8"),
                        ("always", "the base alone showed it in 100% of pictures, above --max-base-rate 0.2")):
        with pytest.raises(SystemExit) as exit_info:
            main(_verify_args(sd1, adapters, "--scorer", f"my_scorers:{scorer}"))
        captured = capsys.readouterr()
        assert exit_info.value.code == 1 and "FAILED" in captured.out
        assert captured.err == f"sdkit: error: {adapters['lora']}: {why}\n"


SCORER_FILE = '''
def sees_purple(picture):
    return ["purple"]
'''


def test_cli_loads_a_scorer_from_the_current_folder_or_a_file(sd1, adapters, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    (here / "scorer_in_this_folder.py").write_text(SCORER_FILE)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "scorer_file.py").write_text(SCORER_FILE)
    monkeypatch.chdir(here)
    search_path = list(sys.path)
    for scorer in ("scorer_in_this_folder:sees_purple", f"{tmp_path / 'elsewhere' / 'scorer_file.py'}:sees_purple",
                   "../elsewhere/scorer_file.py:sees_purple"):
        main(_verify_args(sd1, adapters, "--scorer", scorer, "--max-base-rate", "1", "--json"))
        report = json.loads(capsys.readouterr().out)
        assert report["passed"] and report["labels_with"] == [["purple"]] * 2, scorer
    assert sys.path == search_path
    with pytest.raises(SdkitError, match="missing.py is not a file"):
        load_scorer("missing.py:sees_purple")


def test_the_installed_command_finds_a_file_scorer_and_prints_no_peer_notices(sd1, adapters, tmp_path):
    """`python -I -m sdkit` searches what the installed `sdkit` command searches: not the
    current folder, nor PYTHONPATH."""
    (tmp_path / "scorer_file.py").write_text(SCORER_FILE)
    done = subprocess.run([sys.executable, "-I", "-m", "sdkit", *_verify_args(sd1, adapters, "--scorer",
                           "scorer_file.py:sees_purple", "--max-base-rate", "1", "--json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["passed"]
    assert "torchvision" not in done.stderr and "[transformers]" not in done.stderr


def test_scorer_problems_are_refused_in_one_line(sd1, adapters, scorers):
    with pytest.raises(SdkitError, match="expected module:callable"):
        load_scorer("my_scorers")
    with pytest.raises(SdkitError, match="cannot import it"):
        load_scorer("my_scorers:missing")
    with pytest.raises(SdkitError, match="returned int"):
        verify_adapter(_job(adapters["lora"], sd1.file, scorer="my_scorers:broken"))
    assert as_labels(("Red", "circle"), "s") == ["red", "circle"]


def test_a_file_that_is_no_adapter_is_refused(sd1, tmp_path):
    vae = tmp_path / "vae.safetensors"
    pipe = load_model(sd1.folder).pipe
    save_file({f"encoder.{k}": v.contiguous() for k, v in pipe.vae.encoder.state_dict().items()} |
              {f"decoder.{k}": v.contiguous() for k, v in pipe.vae.decoder.state_dict().items()}, str(vae))
    with pytest.raises(SdkitError, match="verify takes a LoRA"):
        verify_adapter(_job(vae, sd1.file))
