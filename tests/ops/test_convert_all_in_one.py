"""`sdkit convert --to diffusers` of an all-in-one transformer checkpoint (SD3 as Stability
releases it, FLUX.1 as ComfyUI keeps it) into a whole pipeline folder, and back with
`--to single-file`.

Oracle: diffusers' own `from_single_file` of the same checkpoint (offline, with the tiny
model's diffusers folder as its config) gives every component the state dict the folder
sdkit writes loads to with `from_pretrained`, bit for bit; the folder converted back holds
the checkpoint's tensors bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from cli_run import exit_code, run_sdkit
from flow_models import write_flow_pipeline

TOY_FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
SD3_ENCODERS = {"text_encoder": "text_encoders.clip_l.transformer.",
                "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}

T5_TIED = "encoder.embed_tokens.weight"


def _sdkit(capsys, *args: str) -> str:
    code, out, err = run_sdkit(capsys, *map(str, args))
    assert code == 0, err
    return out + err


def _wider_clip_g(folder: Path) -> None:
    """CLIP-G wider than CLIP-L, as released: diffusers' single-file loader tells the two
    apart by width (it would take CLIP-L's tensors for a CLIP-G of the same width)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    torch.manual_seed(1)
    config = CLIPTextConfig(**{**clip_l.to_dict(), "hidden_size": 48, "projection_dim": 48})
    CLIPTextModelWithProjection(config).eval().save_pretrained(folder / "text_encoder_2")
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    transformer["pooled_projection_dim"] = clip_l.hidden_size + 48
    diffusers.SD3Transformer2DModel.from_config(transformer).save_pretrained(folder / "transformer")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD3 pipeline folder and its checkpoint in Stability's all-in-one layout; CLIP-L's
    projection is the identity, as Stability's SD3 takes CLIP-L's pooled output unprojected."""
    root = tmp_path_factory.mktemp("sd3-aio")
    folder = write_flow_pipeline(root / "diffusers", "sd3")
    _wider_clip_g(folder)
    clip_l = folder / "text_encoder" / "model.safetensors"
    weights = load_file(clip_l)
    weights["text_projection.weight"] = torch.eye(weights["text_projection.weight"].shape[0])
    save_file(weights, clip_l)
    tensors = {}
    for component, prefix in (("transformer", "model.diffusion_model."), ("vae", "first_stage_model.")):
        single = root / f"{component}.safetensors"
        assert exit_code(["convert", str(folder / component), "--to", "single-file", "-o", str(single)]) == 0
        tensors.update({prefix + key: value for key, value in load_file(single).items()})
    for component, prefix in SD3_ENCODERS.items():
        tensors.update({prefix + key: value for key, value in load_file(folder / component / "model.safetensors").items()})
    save_file(tensors, root / "sd3-aio.safetensors")
    return {"folder": folder, "checkpoint": root / "sd3-aio.safetensors", "root": root}


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    """toy-flux's parts joined into ComfyUI's all-in-one layout."""
    if not (TOY_FLUX / "diffusers" / "model_index.json").is_file():
        pytest.skip("toy-flux not built (make fixtures)")
    root = tmp_path_factory.mktemp("flux-aio")
    parts = [TOY_FLUX / name for name in ("toy-flux.safetensors", "toy-flux.clip_l.safetensors",
                                          "toy-flux.t5xxl.safetensors", "ae.safetensors")]
    assert exit_code(["join", *map(str, parts), "-o", str(root / "flux-aio.safetensors")]) == 0
    return {"folder": TOY_FLUX / "diffusers", "checkpoint": root / "flux-aio.safetensors", "root": root}


def _state_dicts(pipe, components) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in components}


def _assert_same_components(ours, theirs, components) -> None:
    for component in components:
        mine, peer = ours[component], theirs[component]
        assert mine.keys() == peer.keys(), component
        for key, value in peer.items():
            if value.is_meta:  # diffusers loads T5's table as `shared` and leaves its tied twin unset
                assert key == T5_TIED and torch.equal(mine[key], mine["shared.weight"]), f"{component}: {key}"
                continue
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), f"{component}: {key}"


def _assert_same_file(path: Path, original: Path) -> None:
    back, source = load_file(path), load_file(original)
    assert back.keys() == source.keys()
    for key, value in source.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_folder_loads_what_diffusers_loads_from_the_checkpoint_and_converts_back(family, request, capsys):
    import diffusers

    model = request.getfixturevalue(family)
    output = model["root"] / "pipeline"
    _sdkit(capsys, "convert", model["checkpoint"], "--to", "diffusers", "--config", model["folder"], "-o", output)
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    components = ["transformer", "vae", *(name for name in json.loads((output / "model_index.json").read_text())
                                            if name.startswith("text_encoder"))]
    ours = cls.from_pretrained(output, local_files_only=True)
    # diffusers' FLUX.1 converter knows only the released widths: toy-flux's transformer is
    # handed over (its key map is checked against that converter at released sizes in
    # tests/arch/test_transformer_keymaps.py; the round trip below covers it here)
    given = {"transformer": ours.transformer} if family == "flux" else {}
    theirs = cls.from_single_file(str(model["checkpoint"]), config=str(model["folder"]), local_files_only=True,
                                  **given)
    components = [name for name in components if name not in given]
    _assert_same_components(_state_dicts(ours, components), _state_dicts(theirs, components), components)
    back = model["root"] / "back.safetensors"
    _sdkit(capsys, "convert", output, "--to", "single-file", "-o", back)
    _assert_same_file(back, model["checkpoint"])


def _refused(capsys, output: Path, *args) -> str:
    code, _out, err = run_sdkit(capsys, "convert", *map(str, args), "-o", str(output))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    assert not output.exists() and not list(output.parent.glob(f".{output.name}*"))
    return lines[0]


def test_a_checkpoint_without_a_part_is_refused(sd3, capsys, tmp_path):
    tensors = {k: v for k, v in load_file(sd3["checkpoint"]).items() if not k.startswith(SD3_ENCODERS["text_encoder_2"])}
    save_file(tensors, tmp_path / "no-clip-g.safetensors")
    line = _refused(capsys, tmp_path / "out", tmp_path / "no-clip-g.safetensors", "--to", "diffusers",
                    "--config", sd3["folder"])
    assert "has no text_encoder_2; a Stable Diffusion 3 pipeline needs CLIP-L, CLIP-G, T5-XXL and the SD3 VAE" in line


def test_an_encoder_of_another_family_is_refused(flux, sd3, capsys, tmp_path):
    """A FLUX.1 checkpoint holding SD3's CLIP-G as well: mixed families."""
    tensors = load_file(flux["checkpoint"])
    clip_g = SD3_ENCODERS["text_encoder_2"]
    tensors.update({k: v for k, v in load_file(sd3["checkpoint"]).items() if k.startswith(clip_g)})
    save_file(tensors, tmp_path / "mixed.safetensors")
    line = _refused(capsys, tmp_path / "out", tmp_path / "mixed.safetensors", "--to", "diffusers",
                    "--config", flux["folder"])
    assert f"holds a text encoder under {clip_g}, which FLUX.1 does not use" in line


def test_what_cannot_be_had_offline_asks_for_config(sd3, capsys, tmp_path):
    """Without --config the encoders' configs are missing; a --config folder without the T5
    tokenizer names it (a T5 tokenizer cannot be made offline; a CLIP one of CLIP's
    vocabulary can)."""
    line = _refused(capsys, tmp_path / "out", sd3["checkpoint"], "--to", "diffusers")
    assert "pass --config DIR (a local diffusers folder of this model) for vae, text_encoder" in line
    config = tmp_path / "config"
    shutil.copytree(sd3["folder"], config, ignore=shutil.ignore_patterns("tokenizer_3", "*.safetensors"))
    line = _refused(capsys, tmp_path / "out", sd3["checkpoint"], "--to", "diffusers", "--config", config)
    assert "T5-XXL's tokenizer (tokenizer_3) cannot be made offline; " in line and "has no tokenizer_3/" in line


def test_a_folder_without_a_part_is_refused(sd3, capsys, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(sd3["folder"], folder, ignore=shutil.ignore_patterns("text_encoder_3"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "text_encoder_3"}))
    line = _refused(capsys, tmp_path / "out.safetensors", folder, "--to", "single-file")
    assert "has no text_encoder_3/; an all-in-one Stable Diffusion 3 checkpoint holds CLIP-L, CLIP-G, T5-XXL" in line
