"""Adapter module names resolved on a base model: every dialect, both conventions, fused
OpenCLIP thirds, and the reasons given for names that reach no layer."""

from __future__ import annotations

import pytest
import torch

from sdkit.adapters.lora_format import parse_lora
from sdkit.adapters.lora_names import adapter_address, map_modules, model_names, structure_names
from sdkit.arch import identify
from sdkit.errors import SdkitError
from sdkit.io import model_from_tensors
from sdkit.ops.layout import model_view
from test_lora_support import single_thread  # noqa: F401  (autouse)
from test_lora_support import configs, diffusers_state, ldm_state, tiny_pipeline

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
Q_LDM = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def names_of(tensors: dict[str, torch.Tensor], pipe=None):
    if pipe is None:
        model = model_from_tensors(tensors)
    else:  # a diffusers folder as the reader lays it out
        model = model_from_tensors(tensors)
        model.format = "diffusers"
        model.components = {name: model_from_tensors({k.split("/", 1)[1]: v for k, v in tensors.items()
                                                      if k.startswith(name + "/")}) for name in configs(pipe)}
        model.extra = {"model_index": {"_class_name": type(pipe).__name__}, "configs": configs(pipe)}
    view = model_view(model, identify(model))
    return model_names(view.convention, view.layout, view.tensors, view.configs)


@pytest.fixture(scope="module")
def sd1_pipe():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd1(sd1_pipe):
    return {"ldm": names_of(ldm_state(sd1_pipe)), "diffusers": names_of(diffusers_state(sd1_pipe), sd1_pipe),
            "structure": structure_names("sd1", configs(sd1_pipe))}


@pytest.mark.parametrize("name", [
    "lora_unet_" + Q.replace(".", "_"), "lora_unet_" + Q_LDM.replace(".", "_"), "unet." + Q,
    "unet.base_model.model." + Q, "base_model.model." + Q, Q, "lycoris_" + Q.replace(".", "_"),
    "model.diffusion_model." + Q_LDM, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
])
@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
def test_every_spelling_reaches_the_layer(sd1, name, convention):
    target, reason = sd1[convention].resolve(name)
    assert reason is None, reason
    assert target.diffusers_path == Q and target.ldm_path == Q_LDM
    expected = ("unet/" + Q if convention == "diffusers" else "model.diffusion_model." + Q_LDM) + ".weight"
    assert target.weight.key == expected and target.weight.rows is None


@pytest.mark.parametrize("name", ["lora_te_text_model_encoder_layers_1_mlp_fc2", "lora_te_encoder_layers_1_mlp_fc2",
                                  "text_encoder.text_model.encoder.layers.1.mlp.fc2",
                                  "text_encoder.encoder.layers.1.mlp.fc2"])
def test_text_encoder_names_with_or_without_text_model(sd1, name):
    for convention in ("ldm", "diffusers"):
        target, reason = sd1[convention].resolve(name)
        assert reason is None and target.component == "text_encoder"
        assert target.weight.key.endswith("layers.1.mlp.fc2.weight") and target.bias is not None


def test_old_processor_to_out_name(sd1):
    target, _ = sd1["diffusers"].resolve("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out")
    assert target.weight.key == "unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"


def test_reasons(sd1):
    names = sd1["ldm"]
    assert names.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1") == (None, "the base has no text_encoder_2")
    assert names.resolve("lora_unet_down_blocks_9_proj_in") == (None, "no layer down_blocks_9_proj_in in the base's unet")
    lora = parse_lora({
        f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 16),  # the layer is 32 wide
        f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2),
        f"unet.{Q}.lora_A.weight": torch.zeros(2, 32), f"unet.{Q}.lora_B.weight": torch.zeros(32, 2),
        f"lora_unet_{Q_LDM.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
        f"lora_unet_{Q_LDM.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2)})
    mapping = map_modules(lora, names, {})
    assert list(mapping.mapped) == [f"unet.{Q}"]
    assert mapping.unmapped == {f"lora_unet_{Q.replace('.', '_')}": "adapter makes 32x16, the layer is [32, 32]",
                                f"lora_unet_{Q_LDM.replace('.', '_')}": f"the same layer as unet.{Q}"}


def test_sdxl_fused_thirds_and_ambiguous_bare_names():
    pipe = tiny_pipeline("sdxl")
    names = names_of(ldm_state(pipe))
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    for index, part in enumerate("qkv"):
        target, _ = names.resolve(f"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj")
        assert target.weight.key == key and target.weight.rows == (32 * index, 32 * (index + 1))
        assert target.bias.key == key.replace("weight", "bias") and target.bias.rows == target.weight.rows
    target, _ = names.resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    assert target.weight.key.startswith("conditioner.embedders.0.transformer.text_model.")
    assert names.resolve("text_model.encoder.layers.0.self_attn.q_proj") == \
        (None, "matches layers of text_encoder and text_encoder_2")


def test_adapter_address():
    assert adapter_address("lora_te2_text_model_x") == ("text_encoder_2", "text_model_x")
    assert adapter_address("base_model.model.encoder.layers.0.mlp.fc1") == (None, "encoder_layers_0_mlp_fc1")


# ---- a base known by its structure alone ------------------------------------------------

def test_structure_index_lists_the_layers_of_the_model_it_describes(sd1):
    """Built from the configs, it names the same layers as the index of the model's tensors."""
    def paths(names, component):
        return {(t.diffusers_path.removeprefix("text_model."), t.ldm_path if component == "unet" else None)
                for t in names.targets if t.component == component}

    for component in ("unet", "text_encoder"):
        assert paths(sd1["structure"], component) == paths(sd1["diffusers"], component)
        assert paths(sd1["structure"], component) == paths(sd1["ldm"], component)


@pytest.mark.parametrize("name", [
    "lora_unet_" + Q.replace(".", "_"), "lora_unet_" + Q_LDM.replace(".", "_"), "unet." + Q,
    "unet.base_model.model." + Q, "lycoris_" + Q.replace(".", "_"),
])
def test_structure_index_reaches_layers_by_every_spelling(sd1, name):
    layer, reason = sd1["structure"].resolve(name)
    assert reason is None, reason
    assert (layer.component, layer.diffusers_path, layer.ldm_path) == ("unet", Q, Q_LDM)


def test_structure_index_of_the_released_sdxl():
    names = structure_names("sdxl")
    # kohya names SDXL UNet layers by LDM path: level 1's first attention is input block 4
    layer, _ = names.resolve("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k")
    assert layer.diffusers_path == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    layer, _ = names.resolve("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2")
    assert layer.diffusers_path == "mid_block.attentions.0.transformer_blocks.9.ff.net.2"
    for name in ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "text_encoder_2.encoder.layers.31.mlp.fc2",
                 "text_encoder_2.text_model.encoder.layers.31.mlp.fc2"):
        layer, reason = names.resolve(name)
        assert reason is None and layer.component == "text_encoder_2"
        assert layer.diffusers_path.endswith("encoder.layers.31.mlp.fc2")
    assert names.resolve("lora_te1_text_model_encoder_layers_12_mlp_fc2")[0] is None  # CLIP-L has 12 layers
    assert structure_names("sdxl_refiner").resolve("lora_te1_text_model_encoder_layers_0_mlp_fc1") == \
        (None, "the base has no text_encoder")
    with pytest.raises(SdkitError, match="no module index for layout 'flux'"):
        structure_names("flux")
