"""`sdkit verify`: every adapter kind is sampled with and without, a plugged-in scorer
decides, and the exit code follows --min-rate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

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
    calls.append(picture.size)
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
    return {"lora": lora, "embedding": embedding, "hypernetwork": hypernet, "checkpoint": sd1.file}


def _job(adapter, base, **changes):
    settings = {"concept": "a photo of sks", "expect": "purple/circle", "seeds": 2, "steps": 3, "size": 32,
                "scorer": "my_scorers:always"}
    settings.update(changes)
    return VerifyJob(adapter, base, **settings)


@pytest.mark.parametrize("kind", ["lora", "embedding", "hypernetwork", "checkpoint"])
def test_every_adapter_kind_is_sampled_with_and_without(sd1, adapters, scorers, kind):
    result = verify_adapter(_job(adapters[kind], sd1.file))
    assert result.kind == kind and result.expected == ["purple", "circle"]
    assert (result.with_rate, result.without_rate, result.passed) == (1.0, 1.0, True)
    assert scorers.calls == [(32, 32)] * 4  # two seeds without, two with


def test_the_rate_is_the_fraction_of_seeds_showing_every_expected_label(sd1, adapters, scorers):
    from sdkit.runtime.sample import Sampler, Settings

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


def test_cli_exit_code_follows_min_rate(sd1, adapters, scorers, capsys):
    common = ["verify", str(adapters["lora"]), "--base", str(sd1.file), "--concept", "a photo of sks",
              "--expect", "purple", "--seeds", "2", "--steps", "3", "--size", "32"]
    main(common + ["--scorer", "my_scorers:always", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["with_rate"] == 1.0 and report["kind"] == "lora"
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--scorer", "my_scorers:never"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "FAILED" in captured.out
    assert captured.err.startswith("sdkit: error:") and "below --min-rate 0.8" in captured.err


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
