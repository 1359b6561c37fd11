"""Whole-checkpoint plans: single-file prefixes per layout, inferred configs, and diffusers'
pipeline single-file loader as the oracle (offline, from a local config folder)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdkit.arch.keymaps import (
    checkpoint_from_ldm,
    checkpoint_to_ldm,
    convert_state_dict,
    diffusers_layout,
    ldm_layout,
)
from sdkit.errors import SdkitError

TWO_LEVELS = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8)
SD_UNET = dict(TWO_LEVELS, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
XL_UNET = dict(TWO_LEVELS, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
               use_linear_projection=True, attention_head_dim=(2, 4), addition_embed_type="text_time",
               addition_time_embed_dim=8)
CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# SDXL's two encoders must differ in width: diffusers' loader tells them apart by width
OPEN_CLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, hidden_act="gelu")
LAYOUTS = {
    "sd1": dict(unet=dict(SD_UNET, cross_attention_dim=32), text_encoder=(CLIPTextModel, CLIP_L)),
    "sd2": dict(unet=dict(SD_UNET, cross_attention_dim=48, use_linear_projection=True),
                text_encoder=(CLIPTextModel, OPEN_CLIP)),
    "sdxl": dict(unet=dict(XL_UNET, cross_attention_dim=80, projection_class_embeddings_input_dim=40 + 6 * 8),
                 text_encoder=(CLIPTextModel, CLIP_L),
                 text_encoder_2=(CLIPTextModelWithProjection, dict(OPEN_CLIP, projection_dim=40))),
    "sdxl_refiner": dict(unet=dict(XL_UNET, cross_attention_dim=48, projection_class_embeddings_input_dim=40 + 5 * 8),
                         text_encoder_2=(CLIPTextModelWithProjection, dict(OPEN_CLIP, projection_dim=40))),
}
PREFIXES = {
    "sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
             "conditioner.embedders.1.model."),
    "sdxl_refiner": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.model."),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape))
    return model


@lru_cache(maxsize=None)
def build(layout: str) -> dict[str, torch.nn.Module]:
    """The diffusers components of a toy model in this layout, random weights."""
    torch.manual_seed(0)
    spec = LAYOUTS[layout]
    models = {"unet": UNet2DConditionModel(**spec["unet"]),
              "vae": AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2)}
    for name in ("text_encoder", "text_encoder_2"):
        if name in spec:
            cls, settings = spec[name]
            config = CLIPTextConfig(vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                                    pad_token_id=1, **settings)
            config.architectures = [cls.__name__]
            models[name] = cls(config)
    return {name: randomize(model) for name, model in models.items()}


def state_and_configs(layout: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    models = build(layout)
    state = {f"{name}/{k}": v for name, model in models.items() for k, v in model.state_dict().items()}
    configs = {name: dict(model.config) if name in ("unet", "vae") else model.config.to_dict()
               for name, model in models.items()}
    return state, configs


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    unequal = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not unequal, unequal[:5]


def single_file(layout: str) -> dict[str, torch.Tensor]:
    state, configs = state_and_configs(layout)
    return convert_state_dict(checkpoint_to_ldm(state, configs).plan, state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusers_to_single_file_and_back(layout):
    state, configs = state_and_configs(layout)
    to_ldm = checkpoint_to_ldm(state, configs)
    assert to_ldm.layout == layout and to_ldm.dropped == ()
    ldm = convert_state_dict(to_ldm.plan, state)
    assert all(key.startswith(PREFIXES[layout]) for key in ldm)
    assert all(any(key.startswith(prefix) for key in ldm) for prefix in PREFIXES[layout])
    back = checkpoint_from_ldm({k: v.shape for k, v in ldm.items()}, configs)
    assert back.layout == layout
    assert_identical(convert_state_dict(back.plan, ldm), state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_file_to_diffusers_and_back_reports_what_it_leaves(layout):
    state, configs = state_and_configs(layout)
    ldm = single_file(layout)
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}
    from_ldm = checkpoint_from_ldm({k: v.shape for k, v in {**ldm, **extras}.items()}, configs)
    assert set(from_ldm.dropped) == set(extras) | {k for k in ldm if k.endswith("position_ids")}
    diffusers = convert_state_dict(from_ldm.plan, {**ldm, **extras})
    again = convert_state_dict(checkpoint_to_ldm(diffusers, from_ldm.configs).plan, diffusers)
    assert_identical(again, ldm)


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "sdxl_refiner"])
def test_configs_inferred_from_shapes_load_every_tensor(layout):
    state, configs = state_and_configs(layout)
    ldm = single_file(layout)
    plan = checkpoint_from_ldm({k: v.shape for k, v in ldm.items()})
    diffusers = convert_state_dict(plan.plan, ldm)
    assert_identical(diffusers, state)
    for name, model in build(layout).items():
        rebuilt = type(model)(CLIPTextConfig(**plan.configs[name])) if name.startswith("text") \
            else type(model).from_config(plan.configs[name])
        head = name + "/"
        rebuilt.load_state_dict({k[len(head):]: v for k, v in diffusers.items() if k.startswith(head)}, strict=True)
    if layout.startswith("sdxl"):
        assert plan.configs["unet"]["addition_time_embed_dim"] == 8
        assert plan.configs["vae"]["scaling_factor"] == 0.13025


def test_sd2_inferred_text_encoder_stops_one_layer_early_as_diffusers_does():
    state, _ = state_and_configs("sd2")
    ldm = single_file("sd2")
    plan = checkpoint_from_ldm({k: v.shape for k, v in ldm.items()})
    assert plan.configs["text_encoder"]["num_hidden_layers"] == 2
    assert set(plan.dropped) == {k for k in ldm if k.startswith("cond_stage_model.model.transformer.resblocks.2.")}
    expected = {k: v for k, v in state.items() if not k.startswith("text_encoder/encoder.layers.2.")}
    assert_identical(convert_state_dict(plan.plan, ldm), expected)


def write_config_folder(layout: str, folder: Path) -> None:
    """A diffusers folder with configs, tokenizers and scheduler but no weights."""
    (folder / "vocab").mkdir(parents=True)
    (folder / "vocab" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (folder / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(folder / "vocab" / "vocab.json"),
                              merges_file=str(folder / "vocab" / "merges.txt"))
    models = build(layout)
    parts = dict(models, scheduler=EulerDiscreteScheduler())
    if layout in ("sd1", "sd2"):
        pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif layout == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None, tokenizer_2=tokenizer,
                                                requires_aesthetics_score=True)
    pipe.save_pretrained(folder / "model")
    for weights in (folder / "model").glob("*/*.safetensors"):
        weights.unlink()


PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
             "sdxl_refiner": StableDiffusionXLImg2ImgPipeline}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_file_loads_through_diffusers_pipeline(layout, tmp_path):
    state, _ = state_and_configs(layout)
    save_file(single_file(layout), tmp_path / "model.safetensors")
    write_config_folder(layout, tmp_path)
    pipe = PIPELINES[layout].from_single_file(str(tmp_path / "model.safetensors"), config=str(tmp_path / "model"),
                                              local_files_only=True)
    loaded = {f"{name}/{k}": v for name in build(layout) for k, v in getattr(pipe, name).state_dict().items()}
    assert_identical(loaded, state)


def test_layout_detection():
    assert ldm_layout(single_file("sdxl_refiner")) == "sdxl_refiner"
    assert ldm_layout(["model.diffusion_model.label_emb.0.0.weight"]) == "sdxl"
    _, configs = state_and_configs("sd2")
    assert diffusers_layout(["unet", "text_encoder"], configs) == "sd2"
    assert diffusers_layout(["unet", "text_encoder"], {"text_encoder": {"hidden_act": "quick_gelu"}}) == "sd1"


def test_missing_component_config_is_refused():
    state, configs = state_and_configs("sd1")
    del configs["vae"]
    with pytest.raises(SdkitError, match="vae"):
        checkpoint_to_ldm(state, configs)
