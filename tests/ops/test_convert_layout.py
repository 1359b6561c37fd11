"""Single-file ⇄ diffusers conversion, end to end through files, with diffusers as the oracle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import test_convert_support as S
from sdkit.arch.keymaps import plan_for
from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.ops.convert.model import ConvertOptions, convert_model
from sdkit.ops.layout import extract_component, replace_component

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "fixtures" / "toy" / "sd1"
LDM_PREFIXES = {"sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
                "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
                "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                         "conditioner.embedders.1.model.")}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family: the single file, a config-only diffusers folder and a full one."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for family in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        out[family] = S.write_ldm(root / f"{family}.safetensors", S.ldm_state(family))
        out[f"{family}-config"] = S.write_pipeline(family, root / f"{family}-config", weights=False)
    for family in ("sd1", "sd2", "sdxl"):
        out[f"{family}-folder"] = S.write_pipeline(family, root / f"{family}-folder")
    return out


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """`<component>/<key>` tensors of the weight files of a diffusers folder, as stored."""
    return {f"{weights.parent.name}/{key}": value for weights in sorted(folder.glob("*/*.safetensors"))
            for key, value in load_file(weights).items()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sdxl_refiner"])
def test_single_file_to_diffusers_and_back_is_bit_exact(files, tmp_path, family):
    ldm = S.ldm_state(family)
    junk = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}
    source = S.write_ldm(tmp_path / "in.safetensors", {**ldm, **junk})
    there = convert_model(source, tmp_path / "folder",
                          ConvertOptions(to="diffusers", config_dir=str(files[f"{family}-config"])))
    assert there.written == "folder" and set(junk) <= set(there.left_out)
    back = convert_model(tmp_path / "folder", tmp_path / "back.safetensors", ConvertOptions(to="single-file"))
    assert back.convention == "ldm"
    S.assert_same(load_file(tmp_path / "back.safetensors"), ldm)
    S.assert_same(folder_state(tmp_path / "folder"), S.stored(S.state(family)))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder_equals_diffusers_own_single_file_load(files, tmp_path, family):
    config = files[f"{family}-config"]
    result = convert_model(files[family], tmp_path / "out", ConvertOptions(to="diffusers", config_dir=str(config)))
    peer = S.PIPELINES[family].from_single_file(str(files[family]), config=str(config), local_files_only=True)
    S.assert_same(folder_state(tmp_path / "out"), S.stored(S.pipeline_state(peer, family)))
    loaded = S.PIPELINES[family].from_pretrained(tmp_path / "out", local_files_only=True)
    S.assert_same(S.pipeline_state(loaded, family), S.state(family))
    assert loaded.tokenizer is not None and any("tokenizer/ copied" in note for note in result.notes)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_from_diffusers_loads_back_through_from_single_file(files, tmp_path, family):
    target = tmp_path / "model.safetensors"
    convert_model(files[f"{family}-folder"], target, ConvertOptions(to="single-file"))
    keys = load_file(target)
    assert all(key.startswith(LDM_PREFIXES[family]) for key in keys)
    S.assert_same(keys, S.ldm_state(family))
    peer = S.PIPELINES[family].from_single_file(str(target), config=str(files[f"{family}-config"]),
                                                local_files_only=True)
    S.assert_same(S.pipeline_state(peer, family), S.state(family))


def test_pipeline_without_tokenizer_is_written_and_says_how_to_load_it(files, tmp_path):
    config = tmp_path / "config"
    shutil.copytree(files["sd1-config"], config)
    shutil.rmtree(config / "tokenizer")
    result = convert_model(files["sd1"], tmp_path / "out", ConvertOptions(to="diffusers", config_dir=str(config)))
    assert any("without tokenizer" in note and "tokenizer=None" in note for note in result.notes)
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["tokenizer"] == [None, None]
    loaded = S.PIPELINES["sd1"].from_pretrained(tmp_path / "out", local_files_only=True, tokenizer=None)
    S.assert_same(S.pipeline_state(loaded, "sd1"), S.state("sd1"))


def test_every_written_file_carries_modelspec_and_recipe(files, tmp_path):
    convert_model(files["sdxl"], tmp_path / "out",
                  ConvertOptions(to="diffusers", dtype="fp16", config_dir=str(files["sdxl-config"])))
    digest = hashlib.sha256(files["sdxl"].read_bytes()).hexdigest()
    for weights in (tmp_path / "out").glob("*/*.safetensors"):
        meta = metadata(weights)
        assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["format"] == "pt"
        # the tiny model's size, as its --config says: 8 latents, a VAE of scale 8
        assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "64x64"
        expected = "stable-diffusion-xl-v1-base" + ("/vae" if weights.parent.name == "vae" else "")
        assert meta["modelspec.architecture"] == expected
        recipe = json.loads(meta["sdkit.recipe"])
        assert recipe["operation"] == "convert" and recipe["inputs"] == [{"path": files["sdxl"].name, "sha256": digest}]
        assert recipe["parameters"]["to"] == "diffusers" and recipe["parameters"]["dtype"] == "fp16"


def test_only_vae_as_single_file_is_an_a1111_vae(files, tmp_path):
    target = tmp_path / "model.vae.safetensors"
    convert_model(files["sd1"], target, ConvertOptions(only="vae"))
    expected = {k[len("first_stage_model."):]: v for k, v in S.ldm_state("sd1").items()
                if k.startswith("first_stage_model.")}
    S.assert_same(load_file(target), expected)
    assert {k.split(".")[0] for k in expected} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert metadata(target)["modelspec.architecture"] == "stable-diffusion-v1/vae"


def test_only_vae_in_diffusers_layout_loads_with_autoencoderkl(files, tmp_path):
    convert_model(files["sd1"], tmp_path / "vae", ConvertOptions(to="diffusers", only="vae",
                                                                 config_dir=str(files["sd1-config"])))
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)
    S.assert_same(loaded.state_dict(), S.modules("sd1")["vae"].state_dict())
    convert_model(files["sd1"], tmp_path / "vae.safetensors", ConvertOptions(to="diffusers", only="vae"))
    S.assert_same(load_file(tmp_path / "vae.safetensors"), S.modules("sd1")["vae"].state_dict())


def test_only_unet_and_second_text_encoder_use_bare_ldm_names(files, tmp_path):
    convert_model(files["sdxl-folder"], tmp_path / "unet.safetensors", ConvertOptions(to="single-file", only="unet"))
    unet = load_file(tmp_path / "unet.safetensors")
    expected = {k[len("model.diffusion_model."):]: v for k, v in S.ldm_state("sdxl").items()
                if k.startswith("model.diffusion_model.")}
    S.assert_same(unet, expected)
    assert "input_blocks.0.0.weight" in unet and "label_emb.0.0.weight" in unet
    convert_model(files["sdxl"], tmp_path / "te2.safetensors", ConvertOptions(only="text_encoder_2"))
    te2 = load_file(tmp_path / "te2.safetensors")
    assert "transformer.resblocks.0.attn.in_proj_weight" in te2 and "text_projection" in te2
    back = convert_model(tmp_path / "te2.safetensors", tmp_path / "te2-hf.safetensors",
                         ConvertOptions(to="diffusers", only="text_encoder_2"))
    assert back.convention == "diffusers"
    S.assert_same(load_file(tmp_path / "te2-hf.safetensors"), S.modules("sdxl")["text_encoder_2"].state_dict())


def test_only_a_component_the_model_lacks_is_refused(files, tmp_path):
    with pytest.raises(SdkitError, match="has no text_encoder_2"):
        convert_model(files["sd1"], tmp_path / "te2.safetensors", ConvertOptions(only="text_encoder_2"))
    assert not (tmp_path / "te2.safetensors").exists()


def other_vae() -> AutoencoderKL:
    torch.manual_seed(7)
    vae = S._vae()
    with torch.no_grad():
        for tensor in vae.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape))
    return vae


def test_replace_component_takes_a_diffusers_vae_file_without_config(files, tmp_path):
    vae = other_vae()
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    with open_model(files["sd1"]) as model, open_model(tmp_path / "vae.safetensors") as source:
        swapped = {k: lazy.load() for k, lazy in replace_component(model, "vae", source).items()}
        extracted = {k: lazy.load() for k, lazy in extract_component(source, "vae", "ldm").items()}
    plan = plan_for("vae", dict(vae.config), vae.state_dict(), "diffusers_to_ldm")
    as_ldm = {key: recipe.apply([vae.state_dict()[s] for s in recipe.sources]) for key, recipe in plan.items()}
    S.assert_same(extracted, as_ldm)
    expected = {k: v for k, v in S.ldm_state("sd1").items() if not k.startswith("first_stage_model.")}
    expected.update({"first_stage_model." + k: v for k, v in as_ldm.items()})
    S.assert_same(swapped, expected)


def test_replace_component_refuses_a_part_of_another_shape(files, tmp_path):
    small = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    save_file(small.state_dict(), tmp_path / "small.safetensors")
    with open_model(files["sd1"]) as model, open_model(tmp_path / "small.safetensors") as source:
        with pytest.raises(SdkitError, match="does not fit"):
            replace_component(model, "vae", source)


@pytest.mark.skipif(not (TOY / "toy-sd1.safetensors").is_file() or not (TOY / "diffusers").is_dir(),
                    reason="toy fixtures not built (fixtures/toy/build.py)")
def test_toy_single_file_converts_to_the_committed_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    convert_model(TOY / "toy-sd1.safetensors", tmp_path / "toy",
                  ConvertOptions(to="diffusers", config_dir=str(TOY / "diffusers")))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy", local_files_only=True)
    ours, committed = folder_state(tmp_path / "toy"), S.stored(folder_state(TOY / "diffusers"))
    assert pipe.tokenizer is not None and sorted(ours) == sorted(committed)
    # the single file is the fp16 export of the fp32 folder
    unequal = [k for k in committed if not torch.equal(ours[k], committed[k].to(ours[k].dtype))]
    assert not unequal, unequal[:5]
