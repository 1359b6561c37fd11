"""identify() on LoRA-family files written by the peers that make them (LyCORIS, peft +
diffusers), and on hand-named kohya files of real widths."""

from __future__ import annotations

import json

import pytest
import torch
from arch_models import ATTENTION_TARGETS, TEXT_TARGETS, UNET_TARGETS, empty, tiny_clip, tiny_unet

from sdkit.arch import identify
from sdkit.io import open_model
from sdkit.io.model_file import model_from_tensors


@pytest.fixture
def sd1_modules():
    """Fresh modules: LyCORIS's apply_to re-routes the forward of the layers it adapts."""
    return tiny_unet("sd1"), tiny_clip()


# ---- LyCORIS's own writer, every algorithm ---------------------------------------------

@pytest.mark.parametrize("algo, targets, expected", [
    ("lora", ATTENTION_TARGETS, "lora"),
    ("locon", UNET_TARGETS, "locon"),
    ("loha", UNET_TARGETS, "loha"),
    ("lokr", UNET_TARGETS, "lokr"),
    ("ia3", ATTENTION_TARGETS, "ia3"),
    ("full", UNET_TARGETS, "full"),
    ("glora", ATTENTION_TARGETS, "glora"),
    ("diag-oft", ATTENTION_TARGETS, "oft"),
    ("boft", ATTENTION_TARGETS, "boft"),
])
def test_lycoris_algorithms(algo, targets, expected, sd1_modules, lycoris_file):
    unet, text_encoder = sd1_modules
    path = lycoris_file([(unet, "lora_unet", targets), (text_encoder, "lora_te", TEXT_TARGETS)], algo)
    with open_model(path) as model:
        identity = identify(model)
    assert (identity.kind, identity.adapter_type) == ("lora", expected)
    assert identity.components == ["unet", "text_encoder"]
    assert identity.family == "sd1"  # one text encoder, nothing wider: SD1 by structure
    assert identity.key_convention == ("kohya" if expected in ("lora", "locon", "oft") else "lycoris")
    assert identity.facts["adapter_types"].get(expected, 0) > 0


def test_lycoris_lora_ranks_alphas_and_conv_modules(sd1_modules, lycoris_file):
    unet, _ = sd1_modules
    path = lycoris_file([(unet, "lora_unet", UNET_TARGETS)], "locon")
    with open_model(path) as model:
        identity = identify(model)
    assert identity.facts["lora_rank"] == [4] and identity.facts["lora_alpha"] == [2.0]
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    resnet_convs = sum(1 for name, m in unet.named_modules()
                       if ("resnets" in name or "samplers" in name) and isinstance(m, layers))
    assert identity.facts["conv_modules"] == resnet_convs
    # a UNet-only tiny adapter carries no family evidence at all
    assert identity.family == "unknown" and identity.nonstandard


def test_lycoris_dora_and_norm_modules(sd1_modules, lycoris_file):
    unet, text_encoder = sd1_modules
    path = lycoris_file([(unet, "lora_unet", ATTENTION_TARGETS), (text_encoder, "lora_te", TEXT_TARGETS)],
                        "lora", weight_decompose=True)
    with open_model(path) as model:
        identity = identify(model)
    assert (identity.adapter_type, identity.key_convention, identity.facts["dora"]) == ("dora", "lycoris", True)
    path = lycoris_file([(unet, "lora_unet", ATTENTION_TARGETS)], "lora", name="normed", train_norm=True)
    with open_model(path) as model:
        identity = identify(model)
    assert identity.facts["adapter_types"]["norm"] > 0 and identity.adapter_type == "lora"


def test_declared_network_module_decides_dylora_and_convention(sd1_modules, lycoris_file):
    unet, text_encoder = sd1_modules
    parts = [(unet, "lora_unet", ATTENTION_TARGETS), (text_encoder, "lora_te", TEXT_TARGETS)]
    path = lycoris_file(parts, "dylora", metadata={"ss_network_module": "networks.dylora"})
    with open_model(path) as model:
        identity = identify(model)
    assert (identity.adapter_type, identity.key_convention) == ("dylora", "kohya")
    path = lycoris_file(parts, "lora", name="declared", metadata={
        "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lora"}),
        "ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1"})
    with open_model(path) as model:
        identity = identify(model)
    assert identity.key_convention == "lycoris"
    assert (identity.family, identity.facts["family_evidence"]) == ("sd1", "ss_base_model_version")
    assert identity.prediction == "epsilon"
    assert any(n.startswith("training: network lycoris.kohya, dim 4, alpha 2") for n in identity.notes)


def test_sdxl_text_encoders_by_prefix(lycoris_file):
    unet = tiny_unet("sdxl")
    parts = [(unet, "lora_unet", ATTENTION_TARGETS), (tiny_clip(), "lora_te1", TEXT_TARGETS),
             (tiny_clip("gelu", projection=True), "lora_te2", TEXT_TARGETS)]
    with open_model(lycoris_file(parts, "loha")) as model:
        identity = identify(model)
    assert (identity.family, identity.adapter_type) == ("sdxl-base", "loha")
    assert identity.components == ["unet", "text_encoder", "text_encoder_2"]
    assert identity.nonstandard  # 32-wide encoders, SDXL has 768 and 1280


# ---- peft + diffusers -------------------------------------------------------------------

def _peft_layers(model, **config):
    from peft import LoraConfig, get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, **config))
    return get_peft_model_state_dict(model)


def test_diffusers_saved_lora(tmp_path):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=_peft_layers(tiny_unet(), target_modules=["to_k", "to_q", "to_v"]),
        text_encoder_lora_layers=_peft_layers(tiny_clip(), target_modules=["q_proj", "k_proj"]))
    with open_model(tmp_path / "pytorch_lora_weights.safetensors") as model:
        identity = identify(model)
    assert (identity.kind, identity.adapter_type, identity.key_convention) == ("lora", "lora", "peft")
    assert identity.components == ["unet", "text_encoder"]
    assert identity.family == "sd1" and identity.facts["lora_rank"] == [4]


def test_diffusers_saved_sdxl_lora(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=_peft_layers(tiny_unet("sdxl"), target_modules=["to_k", "to_v"]),
        text_encoder_lora_layers=_peft_layers(tiny_clip(), target_modules=["q_proj"]),
        text_encoder_2_lora_layers=_peft_layers(tiny_clip("gelu", True), target_modules=["q_proj"]))
    with open_model(tmp_path / "pytorch_lora_weights.safetensors") as model:
        identity = identify(model)
    assert (identity.family, identity.key_convention) == ("sdxl-base", "peft")
    assert identity.components == ["unet", "text_encoder", "text_encoder_2"]


def test_peft_dora_and_old_diffusers_names():
    from diffusers.utils import convert_state_dict_to_diffusers

    dora = _peft_layers(tiny_unet(), target_modules=["to_k", "to_q"], use_dora=True)
    identity = identify(model_from_tensors(dora))
    assert (identity.adapter_type, identity.key_convention, identity.components) == ("dora", "peft", ["unet"])
    old_names = convert_state_dict_to_diffusers(_peft_layers(tiny_clip(), target_modules=["q_proj"]))
    assert any(".lora_linear_layer." in key for key in old_names)
    identity = identify(model_from_tensors(old_names))
    assert (identity.kind, identity.key_convention, identity.components) == ("lora", "peft", ["text_encoder"])


def test_peft_loha():
    from peft import LoHaConfig, get_peft_model_state_dict

    unet = tiny_unet()
    unet.add_adapter(LoHaConfig(r=4, alpha=4, target_modules=["to_k", "to_q"]))
    identity = identify(model_from_tensors(get_peft_model_state_dict(unet)))
    assert (identity.adapter_type, identity.key_convention) == ("loha", "peft")


# ---- kohya names at real widths (header-only tensors) ------------------------------------

def _kohya_module(name: str, rows: int, cols: int, rank: int = 8) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": empty(rank, cols), f"{name}.lora_up.weight": empty(rows, rank),
            f"{name}.alpha": torch.tensor(float(rank))}


@pytest.mark.parametrize("context, family", [(768, "sd1"), (1024, "sd2")])
def test_kohya_sd_widths(context, family):
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    tensors = {**_kohya_module(f"{block}_attn2_to_k", 320, context),
               **_kohya_module(f"{block}_attn1_to_q", 320, 320),
               **_kohya_module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", context, context)}
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.nonstandard, identity.key_convention) == (family, False, "kohya")
    assert identity.facts["context_dim"] == context
    assert identity.facts["lora_rank"] == [8] and identity.facts["lora_alpha"] == [8.0]


def test_kohya_sdxl_ldm_block_names():
    tensors = {**_kohya_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048),
               **_kohya_module("lora_unet_output_blocks_0_0_in_layers_2", 1280, 2560 * 9),
               **_kohya_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
               **_kohya_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.nonstandard, identity.adapter_type) == ("sdxl-base", False, "locon")
    assert identity.facts["text_encoder_widths"] == {"text_encoder": 768, "text_encoder_2": 1280}


def test_kohya_flux_names():
    tensors = _kohya_module("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.components) == ("flux", ["transformer"])


_QKV = "lora_unet_double_blocks_0_img_attn_qkv"


@pytest.mark.parametrize("modules, family, evidence", [
    # FLUX.1's design: GELU MLP 4x, single linear1 3 + 4, linear2 1 + 4
    ([(_QKV, 9216, 3072), ("lora_unet_double_blocks_0_img_mlp_0", 12288, 3072)], "flux", "Flux block names"),
    ([(_QKV, 9216, 3072), ("lora_unet_double_blocks_0_img_mod_lin", 18432, 3072)], "flux",
     "FLUX.1 modulation layer names"),
    # FLUX.2 Klein 4B has FLUX.1's width: its SwiGLU MLP (2 x 3x) tells it
    ([(_QKV, 9216, 3072), ("lora_unet_double_blocks_0_img_mlp_0", 18432, 3072)], "flux2", "FLUX.2 MLP widths"),
    ([("lora_unet_single_blocks_0_linear1", 27648, 3072)], "flux2", "FLUX.2 MLP widths"),
    ([("lora_unet_single_blocks_0_linear2", 3072, 12288)], "flux2", "FLUX.2 MLP widths"),
    ([(_QKV, 12288, 4096)], "flux2", "transformer width 4096"),
    ([(_QKV, 18432, 6144)], "flux2", "transformer width 6144"),
    ([("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", 27648, 3072)], "flux2",
     "FLUX.2 layer names"),
    ([(_QKV, 9216, 3072), ("lora_unet_distilled_guidance_layer_layers_0_in_layer", 5120, 5120)], "chroma",
     "Chroma approximator names"),
    ([(_QKV, 9216, 3072), ("lora_unet_nerf_blocks_0_param_generator", 49152, 3072)], "chroma-radiance",
     "Chroma Radiance NeRF head names"),
])
def test_flux_relatives_told_apart(modules, family, evidence):
    tensors = {}
    for name, rows, cols in modules:
        tensors.update(_kohya_module(name, rows, cols))
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.facts["family_evidence"]) == (family, evidence)


def test_chroma_lora_named_by_sd_scripts_model_type():
    model = model_from_tensors(_kohya_module(_QKV, 9216, 3072),
                               metadata={"ss_model_type": "chroma", "ss_base_model_version": "flux1"})
    assert identify(model).family == "chroma"


def test_metadata_family_with_mismatching_width_is_nonstandard():
    tensors = _kohya_module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 32)
    model = model_from_tensors(tensors, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    identity = identify(model)
    assert identity.family == "sdxl-base" and identity.nonstandard
    assert any("cross-attention width 32 (sdxl-base has 2048)" in n for n in identity.notes)


def test_norm_only_adapter_and_tag_frequency():
    tensors = {"lora_unet_mid_block_attentions_0_norm.w_norm": torch.zeros(64),
               "lora_unet_mid_block_attentions_0_norm.b_norm": torch.zeros(64)}
    frequency = {"10_shapes": {"circle": 12, "square": 3}, "5_more": {"circle": 2, "star": 9}}
    model = model_from_tensors(tensors, metadata={"ss_tag_frequency": json.dumps(frequency)})
    identity = identify(model)
    assert (identity.adapter_type, identity.key_convention) == ("norm", "lycoris")
    assert identity.facts["top_tags"] == {"circle": 14, "star": 9, "square": 3}


def test_a_few_lora_keys_do_not_make_a_checkpoint_a_lora(ldm_checkpoint):
    tensors = ldm_checkpoint("sd1")
    tensors.update(_kohya_module("lora_unet_stray", 4, 4, rank=2))
    assert identify(model_from_tensors(tensors)).kind == "checkpoint"


@pytest.mark.parametrize("hidden, family", [(1536, "sd3"), (3072, "flux")])
def test_diffusers_transformer_lora_family_from_hidden_width(hidden, family):
    name = "transformer.transformer_blocks.0.attn.to_k"
    tensors = {f"{name}.lora_A.weight": empty(16, hidden), f"{name}.lora_B.weight": empty(hidden, 16)}
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.components, identity.key_convention) == (family, ["transformer"], "peft")
