"""LoRA kohya ⇄ diffusers and embedding layouts, with diffusers' own loaders as the oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import test_convert_support as S
from sdkit.adapters.embedding import read_embedding
from sdkit.errors import SdkitError
from sdkit.io import open_model
from sdkit.ops.convert.model import ConvertOptions, convert_model
from sdkit.ops.convert.embedding import write_a1111_pt
from sdkit.ops.convert.lora import adapter_metadata

UNET_TARGETS = ["attn2.to_k", "attn2.to_v", "proj_in", "conv1", "conv2", "time_emb_proj", "conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ENCODERS = {"sd1": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def pipeline(family: str, tokenizer: Any = None) -> Any:
    parts = copy.deepcopy(S.modules(family))
    if family == "sd1":
        return StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=PNDMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     scheduler=EulerDiscreteScheduler())


def write_peft_lora(family: str, folder: Path) -> Path:
    """A LoRA trained-looking by peft, saved by diffusers: uneven ranks, LoCon alphas of their own.

    (diffusers' kohya reader loses per-module alphas of attention layers, so those share one.)
    """
    pipe = pipeline(family)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"proj_in": 2},
                                     alpha_pattern={"conv1": 3, "conv2": 3}, init_lora_weights=False))
    layers: dict[str, Any] = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
                              "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()}
    for alpha, name in enumerate(ENCODERS[family], start=1):
        encoder = getattr(pipe, name)
        encoder.add_adapter(LoraConfig(r=2, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False))
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
        layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def fused(family: str, lora: Path) -> dict[str, torch.Tensor]:
    """The model's weights after diffusers loads `lora` and fuses it."""
    pipe = pipeline(family)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return S.pipeline_state(pipe, family)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    out = {family: write_peft_lora(family, root / family) for family in ("sd1", "sdxl")}
    out["sdxl-config"] = S.write_pipeline("sdxl", root / "sdxl-config", weights=False)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_conversion_fuses_as_the_diffusers_original_and_converts_back_bit_exact(loras, tmp_path, family):
    config = {"config_dir": str(loras["sdxl-config"])} if family == "sdxl" else {}
    original = loras[family]
    convert_model(original, tmp_path / "kohya.safetensors", ConvertOptions(to="single-file", **config))
    kohya = load_file(tmp_path / "kohya.safetensors")
    assert all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in kohya)
    expected = fused(family, original)
    assert sum(not torch.equal(expected[k], v) for k, v in S.state(family).items()) > 100  # the LoRA does something
    ours = fused(family, tmp_path / "kohya.safetensors")
    assert sorted(ours) == sorted(expected)
    assert all(torch.allclose(ours[k], expected[k], rtol=0, atol=1e-6) for k in expected)
    convert_model(tmp_path / "kohya.safetensors", tmp_path / "back.safetensors",
                  ConvertOptions(to="diffusers", **config))
    S.assert_same(load_file(tmp_path / "back.safetensors"), load_file(original))
    if family == "sd1":  # diffusers reads our lora_adapter_metadata as it reads its own
        again = fused(family, tmp_path / "back.safetensors")
        assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_kohya_names_follow_the_trainer_per_family(loras, tmp_path):
    convert_model(loras["sd1"], tmp_path / "sd1.safetensors", ConvertOptions(to="single-file"))
    convert_model(loras["sdxl"], tmp_path / "sdxl.safetensors",
                  ConvertOptions(to="single-file", config_dir=str(loras["sdxl-config"])))
    sd1, sdxl = load_file(tmp_path / "sd1.safetensors"), load_file(tmp_path / "sdxl.safetensors")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in sd1
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd1
    # SDXL: the LDM block numbering of kohya's sgm UNet (level 1's first attention is input block 4)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in sdxl
    assert "lora_unet_middle_block_1_proj_in.lora_up.weight" in sdxl
    assert {k.split("_text_model")[0] for k in sdxl if "_text_model" in k} == {"lora_te1", "lora_te2"}
    assert sd1["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 3.0
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 8.0
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    assert metadata(tmp_path / "sdxl.safetensors")["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "lora_adapter_metadata" not in metadata(tmp_path / "sdxl.safetensors")


def test_diffusers_lora_cast_in_place_keeps_its_peft_alphas(loras, tmp_path):
    convert_model(loras["sd1"], tmp_path / "half.safetensors", ConvertOptions(dtype="fp16"))
    original = load_file(loras["sd1"])
    S.assert_same(load_file(tmp_path / "half.safetensors"), {k: v.half() for k, v in original.items()})
    key = "lora_adapter_metadata"
    assert metadata(tmp_path / "half.safetensors")[key] == metadata(loras["sd1"])[key]


def test_per_module_alphas_survive_kohya_to_diffusers(tmp_path):
    """kohya alphas that differ per attention layer come back as peft alpha patterns."""
    paths = {x: f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{x}" for x in "qk"}
    torch.manual_seed(0)
    tensors = {}
    for x, alpha in (("q", 2.0), ("k", 6.0)):
        kohya = "lora_unet_" + paths[x].replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"] = torch.randn(4, 320)
        tensors[f"{kohya}.lora_up.weight"] = torch.randn(320, 4)
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "kohya.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    convert_model(tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors", ConvertOptions(to="diffusers"))
    config = json.loads(metadata(tmp_path / "peft.safetensors")["lora_adapter_metadata"])
    patterns = {config["unet.lora_alpha"], *config["unet.alpha_pattern"].values()}
    assert patterns == {2.0, 6.0} and len(config["unet.alpha_pattern"]) == 1
    assert sorted(config["unet.target_modules"]) == sorted(paths.values())
    assert sorted(load_file(tmp_path / "peft.safetensors")) == sorted(
        f"unet.{path}.lora_{role}.weight" for path in paths.values() for role in "AB")
    assert json.loads(adapter_metadata({"unet": [("a", 4, 4.0)]}))["unet.r"] == 4


def test_lycoris_modules_and_unknown_names_are_refused(tmp_path):
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.randn(320, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.randn(2, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_a": torch.randn(320, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w2_b": torch.randn(2, 320)}
    save_file(tensors, tmp_path / "loha.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(SdkitError, match="is loha"):
        convert_model(tmp_path / "loha.safetensors", tmp_path / "o.safetensors", ConvertOptions(to="diffusers"))
    save_file({"lora_unet_nowhere_block.lora_down.weight": torch.randn(2, 8),
               "lora_unet_nowhere_block.lora_up.weight": torch.randn(8, 2)}, tmp_path / "odd.safetensors",
              metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(SdkitError, match="not modules of the sd1 base model.*nowhere"):
        convert_model(tmp_path / "odd.safetensors", tmp_path / "o.safetensors", ConvertOptions(to="diffusers"))
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_pickle_keeps_its_names_in_safetensors_and_casts(tmp_path):
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    torch.save(tensors, tmp_path / "lora.pt")
    convert_model(tmp_path / "lora.pt", tmp_path / "lora.safetensors", ConvertOptions(dtype="fp16"))
    S.assert_same(load_file(tmp_path / "lora.safetensors"), {k: v.half() for k, v in tensors.items()})


# ---- embeddings ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def a1111_embedding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embeddings") / "style.pt"
    torch.manual_seed(3)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 16)}, "name": "style",
                "step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "base"}, path)
    return path


def loaded_rows(path: Path, tokenizer_folder: Path, **kwargs: Any) -> torch.Tensor:
    """The token-embedding rows diffusers' load_textual_inversion adds for `path`."""
    pipe = pipeline("sd1", S.tokenizer(tokenizer_folder))
    before = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    pipe.load_textual_inversion(str(path), **kwargs)
    return pipe.text_encoder.get_input_embeddings().weight[before:].detach().clone()


def test_a1111_embedding_to_diffusers_and_kohya_loads_like_the_original(a1111_embedding, tmp_path):
    expected = loaded_rows(a1111_embedding, tmp_path / "v0")
    convert_model(a1111_embedding, tmp_path / "learned_embeds.safetensors", ConvertOptions(to="diffusers"))
    assert list(load_file(tmp_path / "learned_embeds.safetensors")) == ["style"]
    assert torch.equal(loaded_rows(tmp_path / "learned_embeds.safetensors", tmp_path / "v1"), expected)
    convert_model(a1111_embedding, tmp_path / "style.safetensors")
    assert list(load_file(tmp_path / "style.safetensors")) == ["emb_params"]
    assert torch.equal(loaded_rows(tmp_path / "style.safetensors", tmp_path / "v2", token="style"), expected)
    meta = metadata(tmp_path / "style.safetensors")
    assert meta["modelspec.architecture"].endswith("/textual-inversion") or meta["modelspec.architecture"] == "unknown"


def test_embedding_back_to_a1111_pt(a1111_embedding, tmp_path):
    convert_model(a1111_embedding, tmp_path / "style.safetensors", ConvertOptions(dtype="fp16"))
    convert_model(tmp_path / "style.safetensors", tmp_path / "again.pt")
    data = torch.load(tmp_path / "again.pt", weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "style"
    original = read_embedding(a1111_embedding).vectors["text_encoder"]
    assert torch.equal(data["string_to_param"]["*"], original.half())
    assert json.loads(data["sdkit.recipe"])["operation"] == "convert"
    assert torch.equal(read_embedding(tmp_path / "again.pt").vectors["text_encoder"], original.half().float())


def test_write_a1111_pt_loads_in_diffusers_and_replaces_only_when_asked(a1111_embedding, tmp_path):
    embedding = read_embedding(a1111_embedding)
    vectors = embedding.vectors["text_encoder"]
    path = write_a1111_pt(tmp_path / "style.pt", embedding, "F16", {"sd_checkpoint": "0123abcd", "note": "kept"})
    assert torch.equal(loaded_rows(path, tmp_path / "tokenizer", token="style"), vectors.half().float())
    data = torch.load(path, weights_only=True)
    assert (data["name"], data["sd_checkpoint"], data["sd_checkpoint_name"], data["note"]) == \
        ("style", "0123abcd", "base", "kept")
    with pytest.raises(SdkitError, match="already exists"):
        write_a1111_pt(path, embedding, "F32", {})
    write_a1111_pt(path, embedding, "F32", {}, overwrite=True)
    assert torch.equal(torch.load(path, weights_only=True)["string_to_param"]["*"], vectors.float())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["style.pt"]


def test_sdxl_embedding_keeps_clip_l_and_clip_g(tmp_path):
    tensors = {"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}
    save_file(tensors, tmp_path / "xl.safetensors")
    result = convert_model(tmp_path / "xl.safetensors", tmp_path / "out.safetensors", ConvertOptions(to="diffusers"))
    S.assert_same(load_file(tmp_path / "out.safetensors"), tensors)
    assert any("clip_l + clip_g" in note for note in result.notes)
    with pytest.raises(SdkitError, match="no A1111 .pt layout"):
        convert_model(tmp_path / "xl.safetensors", tmp_path / "out.pt")
    with open_model(tmp_path / "out.safetensors") as model:
        assert model.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
