"""FLUX.1 training from the split parts ComfyUI users keep (fixtures/toy/flux: the diffusion
model alone in BFL names, clip_l, t5xxl and ae.safetensors, all fp16 casts of the diffusers
folder), and from the parts `sdkit train` / `sdkit sample` find in a library.

Oracles: the LoRA trained from the parts holds the factors of the LoRA trained, with the
same seed, from the diffusers folder whose weights are rounded to fp16 as the parts are
(torch's own cast); a ComfyUI scaled fp8 diffusion model trains as the plain file of its
values, weight x scale_weight (ComfyUI's dequantization), computed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_run import run_sdkit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdkit.runtime.toyscore import write_concept_pictures

FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
FOLDER = FLUX / "diffusers"
DIFFUSION_MODEL = FLUX / "toy-flux.safetensors"
CLIP_L, T5XXL, VAE = FLUX / "toy-flux.clip_l.safetensors", FLUX / "toy-flux.t5xxl.safetensors", FLUX / "ae.safetensors"
PARTS = ["--config", str(FOLDER), "--vae", str(VAE), "--text-encoder", str(CLIP_L), "--text-encoder", str(T5XXL)]
STEPS = ["--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--rank", "2", "--seed", "5"]
PROMPT = "a photo of sks"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(),
                                                   reason="toy-flux not built (make fixtures)")]


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    return write_concept_pictures(tmp_path_factory.mktemp("concept"), "red", "square", PROMPT, count=4)


def train_cli(capsys, base: Path, output: Path, concept: Path, *options: str, method: str = "lora",
              library: Path | None = None) -> str:
    """`sdkit [--library LIBRARY] train` on `base`; its stderr."""
    group = ["--library", str(library)] if library else []
    code, _, err = run_sdkit(capsys, *group, "train", method, "--base", str(base), "--data", str(concept),
                             "-o", str(output), *STEPS, *options)
    assert code == 0, err
    return err


def factors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as opened:
        return {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118 - safe_open is no mapping


def assert_same_factors(ours: Path, theirs: Path) -> None:
    mine, other = factors(ours), factors(theirs)
    assert sorted(mine) == sorted(other)
    # the factors that start at zero (LoRA's up, LoKr's w2_b) moved: it trained
    assert max(t.abs().max().item() for k, t in mine.items() if k.endswith(("lora_up.weight", "lokr_w2_b"))) > 0
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-5, atol=1e-7, msg=key)


def fp16_folder(root: Path) -> Path:
    """The diffusers folder with every weight rounded to fp16 (kept in fp32), as the parts hold them."""
    folder = root / "diffusers-fp16"
    shutil.copytree(FOLDER, folder)
    for weights in folder.rglob("*.safetensors"):
        save_file({k: t.half().float() for k, t in load_file(weights).items()}, weights)
    return folder


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_split_parts_train_the_lora_the_diffusers_folder_trains(capsys, concept, tmp_path, method):
    parts = tmp_path / "parts.safetensors"
    folder = tmp_path / "folder.safetensors"
    train_cli(capsys, DIFFUSION_MODEL, parts, concept, *PARTS, method=method)
    train_cli(capsys, fp16_folder(tmp_path), folder, concept, method=method)
    assert_same_factors(parts, folder)
    with safe_open(parts, "pt") as opened:
        recipe = json.loads(opened.metadata()["sdkit.recipe"])
    assert [item["path"] for item in recipe["inputs"]] == [DIFFUSION_MODEL.name, CLIP_L.name, T5XXL.name, VAE.name,
                                                           concept.name]


def dequantized(scaled: Path, out: Path) -> Path:
    """ComfyUI's reading of a scaled fp8 file: each weight times its scale_weight."""
    tensors = load_file(scaled)
    assert any(key.endswith(".scale_weight") for key in tensors) and "scaled_fp8" in tensors
    plain = {}
    for key, tensor in tensors.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = tensors.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        plain[key] = tensor.float() * scale.float() if scale is not None else tensor.float()
    save_file(plain, out)
    return out


def test_scaled_fp8_diffusion_model_trains_on_its_values(capsys, concept, tmp_path):
    scaled = tmp_path / "toy-flux-fp8-scaled.safetensors"
    assert run_sdkit(capsys, "convert", str(DIFFUSION_MODEL), "--dtype", "fp8_e4m3fn", "--fp8-scaling", "scaled",
                     "-o", str(scaled))[0] == 0
    values = dequantized(scaled, tmp_path / "values.safetensors")
    train_cli(capsys, scaled, tmp_path / "fp8.safetensors", concept, *PARTS)
    train_cli(capsys, values, tmp_path / "values-lora.safetensors", concept, *PARTS)
    assert_same_factors(tmp_path / "fp8.safetensors", tmp_path / "values-lora.safetensors")


@pytest.fixture
def library(tmp_path) -> Path:
    """A ComfyUI folder holding the toy's parts (a T5 also in the legacy `clip` folder)."""
    root = tmp_path / "ComfyUI"
    for folder in ("checkpoints", "loras", "diffusion_models", "text_encoders", "clip", "vae"):
        (root / "models" / folder).mkdir(parents=True)
    shutil.copy(DIFFUSION_MODEL, root / "models" / "diffusion_models")
    shutil.copy(CLIP_L, root / "models" / "text_encoders" / "clip_l.safetensors")
    shutil.copy(T5XXL, root / "models" / "clip" / "t5xxl_fp16.safetensors")
    shutil.copy(VAE, root / "models" / "vae" / "ae.safetensors")
    return root


def test_train_finds_the_parts_in_the_library(capsys, concept, library, tmp_path):
    found, given = tmp_path / "found.safetensors", tmp_path / "given.safetensors"
    err = train_cli(capsys, DIFFUSION_MODEL, found, concept, "--config", str(FOLDER), library=library)
    models = library / "models"
    assert f"CLIP-L text encoder: {models / 'text_encoders' / 'clip_l.safetensors'} (from the library)" in err
    assert f"T5-XXL text encoder: {models / 'clip' / 't5xxl_fp16.safetensors'} (from the library)" in err
    assert f"FLUX VAE: {models / 'vae' / 'ae.safetensors'} (from the library)" in err
    train_cli(capsys, DIFFUSION_MODEL, given, concept, *PARTS)
    assert_same_factors(found, given)


def test_sample_finds_the_parts_in_the_library(capsys, library, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    drawn = {}
    for name, options in (("found", ["--config", str(FOLDER)]), ("given", PARTS)):
        if name == "found":
            monkeypatch.setenv("SDKIT_LIBRARY", str(library))
        else:
            monkeypatch.delenv("SDKIT_LIBRARY")
        out = tmp_path / f"{name}.png"
        code, _, err = run_sdkit(capsys, "sample", str(DIFFUSION_MODEL), *options, "-p", "a red square",
                                 "--cfg", "6", "--steps", "4", "-o", str(out))
        assert code == 0, err
        assert ("(from the library)" in err) == (name == "found")
        drawn[name] = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(drawn["found"], drawn["given"])


def test_a_lone_diffusion_model_without_its_parts_is_refused(concept, tmp_path):
    from sdkit.errors import SdkitError
    from sdkit.runtime.train import DataOptions, TrainConfig, train

    output = tmp_path / "out.safetensors"
    with pytest.raises(SdkitError, match="from the diffusion model with its --text-encoder and --vae files"):
        train(TrainConfig("lora", DIFFUSION_MODEL, output, DataOptions(concept)))
    assert not output.exists()
