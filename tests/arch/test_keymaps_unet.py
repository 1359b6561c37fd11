"""UNet maps against diffusers' own UNet2DConditionModel and its single-file loader.

Models are random-weight diffusers UNets: toy two-level layouts and the real SD1.5, SD2.1,
SDXL base and refiner block structures at reduced width (SDXL's non-uniform transformer
depth kept, reduced from (1, 2, 10) to (1, 2, 3)).
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from sdkit.arch.keymaps import convert_state_dict, infer_unet_config_from_ldm, plan_for, unet_plan
from sdkit.errors import SdkitError

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
CONFIGS = {
    "toy_1_layer": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "toy_2_layers_all_attention": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                                       down_block_types=("CrossAttnDownBlock2D",) * 2,
                                       up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=4),
    "toy_sdxl": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     use_linear_projection=True, attention_head_dim=(2, 4), addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
    "toy_asymmetric_depth": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                                 down_block_types=("CrossAttnDownBlock2D",) * 2,
                                 up_block_types=("CrossAttnUpBlock2D",) * 2,
                                 transformer_layers_per_block=[[1, 2], [2, 1]],
                                 reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1, 1]], attention_head_dim=4),
    "toy_uneven_layers": dict(block_out_channels=(32, 64), layers_per_block=(1, 2), cross_attention_dim=32,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "sd15": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=48,
                 down_block_types=SD_DOWN, up_block_types=SD_UP, attention_head_dim=8),
    "sd21": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=64,
                 down_block_types=SD_DOWN, up_block_types=SD_UP, attention_head_dim=(2, 4, 8, 8),
                 use_linear_projection=True),
    "sdxl": dict(block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=80,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, attention_head_dim=(1, 2, 4),
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=96),
    "sdxl_refiner": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=48,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=2, use_linear_projection=True, attention_head_dim=(1, 2, 4, 4),
                         addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=72),
}
# the fields an LDM file determines, as diffusers spells them
LOADING_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                  "up_block_types", "cross_attention_dim", "use_linear_projection", "addition_embed_type",
                  "projection_class_embeddings_input_dim")


@lru_cache(maxsize=None)
def build(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A UNet's config and state dict, every tensor random so no two are alike."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**CONFIGS[name])
    state = {key: torch.randn(value.shape) for key, value in model.state_dict().items()}
    return dict(model.config), state


def to_ldm(config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(plan_for("unet", config, state, "diffusers_to_ldm"), state)


def to_diffusers(config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(plan_for("unet", config, state, "ldm_to_diffusers"), state)


def plain(value):
    """Config values compare alike whether stored as tuples or lists."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize("name", CONFIGS)
def test_full_plan_covers_exactly_the_model_tensors(name):
    config, state = build(name)
    assert sorted(unet_plan(config, "ldm_to_diffusers")) == sorted(state)
    sources = [s for recipe in unet_plan(config, "diffusers_to_ldm").values() for s in recipe.sources]
    assert sorted(sources) == sorted(state)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips_are_bit_identical(name):
    config, state = build(name)
    ldm = to_ldm(config, state)
    assert_identical(to_diffusers(config, ldm), state)
    assert_identical(to_ldm(config, to_diffusers(config, ldm)), ldm)


# diffusers' converter computes block numbers from a single layers_per_block
@pytest.mark.parametrize("name", [name for name in CONFIGS if name != "toy_uneven_layers"])
def test_diffusers_own_ldm_conversion_agrees(name):
    config, state = build(name)
    ldm = to_ldm(config, state)
    theirs = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, config)
    assert_identical(theirs, to_diffusers(config, ldm))


@pytest.mark.parametrize("name", ["toy_1_layer", "toy_sdxl", "sd15", "sdxl"])
def test_single_file_loads_back_through_diffusers(name, tmp_path):
    config, state = build(name)
    path = tmp_path / "unet.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in to_ldm(config, state).items()}, path)
    UNet2DConditionModel(**CONFIGS[name]).save_config(tmp_path / "config")
    loaded = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    assert_identical(loaded.state_dict(), state)


@pytest.mark.parametrize("name", CONFIGS)
def test_inferred_config_loads_the_converted_weights(name):
    config, state = build(name)
    ldm = to_ldm(config, state)
    inferred = infer_unet_config_from_ldm({f"model.diffusion_model.{k}": v.shape for k, v in ldm.items()},
                                          "model.diffusion_model.", addition_time_embed_dim=8)
    model = UNet2DConditionModel.from_config(inferred)
    for field in LOADING_FIELDS:
        assert plain(model.config[field]) == plain(config[field]), field
    model.load_state_dict(to_diffusers(inferred, ldm), strict=True)


def test_inferred_transformer_depths_match_the_config():
    for name in ("sdxl", "toy_asymmetric_depth", "sdxl_refiner"):
        config, state = build(name)
        inferred = infer_unet_config_from_ldm({k: v.shape for k, v in to_ldm(config, state).items()})
        depth = config["transformer_layers_per_block"]
        assert plain(inferred["transformer_layers_per_block"]) == plain(depth)
        assert plain(inferred.get("reverse_transformer_layers_per_block")) == plain(
            config["reverse_transformer_layers_per_block"])


def test_upsampler_slot_follows_attention():
    config, state = build("sd15")
    ldm = to_ldm(config, state)
    # SD1.5: the first up level has no attention, the others do
    assert "output_blocks.2.1.conv.weight" in ldm and "output_blocks.5.2.conv.weight" in ldm
    assert "output_blocks.8.2.conv.weight" in ldm and not any(k.startswith("output_blocks.11.2") for k in ldm)
    assert torch.equal(ldm["output_blocks.2.1.conv.weight"], state["up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(ldm["output_blocks.5.2.conv.bias"], state["up_blocks.1.upsamplers.0.conv.bias"])


def test_sdxl_label_embedding_and_fixed_places():
    config, state = build("sdxl")
    ldm = to_ldm(config, state)
    pairs = {"label_emb.0.0.weight": "add_embedding.linear_1.weight", "label_emb.0.2.bias": "add_embedding.linear_2.bias",
             "time_embed.2.weight": "time_embedding.linear_2.weight", "input_blocks.0.0.weight": "conv_in.weight",
             "out.0.weight": "conv_norm_out.weight", "out.2.bias": "conv_out.bias",
             "middle_block.1.transformer_blocks.2.attn2.to_k.weight":
                 "mid_block.attentions.0.transformer_blocks.2.attn2.to_k.weight",
             "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
             "output_blocks.0.1.transformer_blocks.2.ff.net.2.weight":
                 "up_blocks.0.attentions.0.transformer_blocks.2.ff.net.2.weight"}
    for ldm_key, diffusers_key in pairs.items():
        assert torch.equal(ldm[ldm_key], state[diffusers_key]), ldm_key


def test_partial_input_gives_partial_output():
    config, state = build("toy_1_layer")
    part = {k: v for k, v in to_ldm(config, state).items() if k.startswith("input_blocks.1.")}
    out = to_diffusers(config, part)
    assert out and all(k.startswith(("down_blocks.0.resnets.0.", "down_blocks.0.attentions.0.")) for k in out)


def test_stray_key_is_refused():
    config, state = build("toy_1_layer")
    ldm = to_ldm(config, state)
    ldm["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(SdkitError, match="input_blocks.9.0.in_layers.0.weight"):
        plan_for("unet", config, ldm, "ldm_to_diffusers")


@pytest.mark.parametrize("change", [{"time_cond_proj_dim": 8}, {"mid_block_type": None},
                                    {"down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")},
                                    {"addition_embed_type": "image"}])
def test_layouts_without_an_ldm_counterpart_are_refused(change):
    config, _ = build("toy_1_layer")
    with pytest.raises(SdkitError, match="unet config"):
        unet_plan({**config, **change}, "diffusers_to_ldm")


def test_full_size_plans_name_the_keys_of_real_files():
    """Names only (no tensors): real SD1.5 / SD2 / SDXL configs give the keys peers look for."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    sd15 = dict(cross_attention_dim=768)  # the rest are UNet2DConditionModel defaults: SD1.5
    sd2 = dict(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(5, 10, 20, 20))
    sdxl = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    prefix = "model.diffusion_model."
    expected = {
        "sd15": [CHECKPOINT_KEY_NAMES["v1"], prefix + "output_blocks.2.1.conv.weight",
                 prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
        "sd2": [CHECKPOINT_KEY_NAMES["v2"], prefix + "output_blocks.5.2.conv.weight"],
        "sdxl": [prefix + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", prefix + "label_emb.0.0.weight",
                 prefix + "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
                 prefix + "output_blocks.2.2.conv.weight", prefix + "input_blocks.8.1.transformer_blocks.9.norm3.bias"],
    }
    for name, config in (("sd15", sd15), ("sd2", sd2), ("sdxl", sdxl)):
        ldm = {prefix + key for key in unet_plan(config, "diffusers_to_ldm")}
        missing = [key for key in expected[name] if key not in ldm]
        assert not missing, (name, missing)
    assert prefix + "input_blocks.10.1.transformer_blocks.0.norm1.weight" not in {
        prefix + key for key in unet_plan(sd15, "diffusers_to_ldm")}  # SD1.5's fourth level has no attention
