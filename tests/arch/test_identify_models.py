"""identify() on checkpoints and their parts: tiny peer-built models in both conventions,
and full-size decisive keys (header-only tensors) for the real families."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from arch_models import diffusers_model_file, empty, pipeline_parts, tiny_clip, tiny_unet, tiny_vae

from sdkit.arch import identify
from sdkit.arch.hygiene import broken_position_ids
from sdkit.io import open_model
from sdkit.io.model_file import model_from_tensors

UNET = "model.diffusion_model."
VAE = "first_stage_model."


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}


# ---- tiny models: family by structure, in both conventions -------------------------------

FAMILIES = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl-base", "refiner": "sdxl-refiner"}
COMPONENTS = {
    "sd1": ["unet", "vae", "text_encoder"], "sd2": ["unet", "vae", "text_encoder"],
    "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"],
    "refiner": ["unet", "vae", "text_encoder_2"],
}


@pytest.mark.parametrize("layout", list(FAMILIES))
def test_tiny_diffusers_pipeline_family_by_structure(layout):
    modules, index = pipeline_parts(layout)
    identity = identify(diffusers_model_file(modules, index))
    assert (identity.kind, identity.family, identity.key_convention) == (
        "checkpoint", FAMILIES[layout], "diffusers")
    assert identity.components == COMPONENTS[layout]
    assert identity.variant == "normal"
    assert identity.nonstandard
    assert any(n.startswith("non-standard dimensions: UNet width 32") for n in identity.notes)


@pytest.mark.parametrize("layout", list(FAMILIES))
def test_tiny_ldm_checkpoint_family_by_structure(layout, ldm_checkpoint):
    identity = identify(model_from_tensors(ldm_checkpoint(layout)))
    assert (identity.kind, identity.family, identity.key_convention) == (
        "checkpoint", FAMILIES[layout], "ldm")
    assert identity.components == COMPONENTS[layout]
    assert identity.nonstandard
    assert "contains a baked VAE" in identity.notes
    assert identity.facts["context_dim"] == modules_context(layout)


def modules_context(layout: str) -> int:
    return tiny_unet({"sdxl": "sdxl", "refiner": "refiner"}.get(layout, layout)).config.cross_attention_dim


def test_checkpoint_without_vae_says_so(ldm_checkpoint):
    tensors = {k: t for k, t in ldm_checkpoint("sd1").items() if not k.startswith(VAE)}
    identity = identify(model_from_tensors(tensors))
    assert identity.kind == "checkpoint" and "no VAE" in identity.notes
    assert identity.components == ["unet", "text_encoder"]


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_standalone_unet_in_three_conventions(layout, ldm_checkpoint):
    family = FAMILIES[layout]
    prefixed = {k: t for k, t in ldm_checkpoint(layout).items() if k.startswith(UNET)}
    bare = _strip(prefixed, UNET)
    diffusers = tiny_unet(layout).state_dict()
    for tensors, convention in ((prefixed, "ldm"), (bare, "ldm"), (diffusers, "diffusers")):
        identity = identify(model_from_tensors(tensors))
        assert (identity.kind, identity.family, identity.key_convention) == ("unet", family, convention)
        assert identity.components == ["unet"]


def test_sd2_unet_alone_is_told_by_its_linear_projection():
    identity = identify(model_from_tensors(tiny_unet("sd2").state_dict()))
    assert identity.family == "sd2" and identity.facts["denoiser"]["linear_projection"] is True


@pytest.mark.parametrize("in_channels, variant", [(9, "inpaint"), (8, "pix2pix"), (5, "depth"), (4, "normal")])
def test_variant_from_unet_input_channels(in_channels, variant):
    identity = identify(model_from_tensors(tiny_unet("sd1", in_channels=in_channels).state_dict()))
    assert identity.variant == variant and identity.facts["in_channels"] == in_channels


def test_standalone_text_encoders(ldm_checkpoint):
    flat = tiny_clip().state_dict()  # transformers 5: no `text_model.` level
    nested = {"text_model." + k: t for k, t in flat.items()}
    for tensors in (flat, nested):
        identity = identify(model_from_tensors(tensors))
        assert (identity.kind, identity.family, identity.key_convention) == ("text-encoder", "sd1", "diffusers")
        assert identity.components == ["text_encoder"]
    second = identify(model_from_tensors(tiny_clip("gelu", projection=True).state_dict()))
    assert (second.family, second.components) == ("sdxl-base", ["text_encoder_2"])
    openclip = {k: t for k, t in ldm_checkpoint("sd2").items() if k.startswith("cond_stage_model.")}
    identity = identify(model_from_tensors(openclip))
    assert (identity.kind, identity.family, identity.key_convention) == ("text-encoder", "sd2", "ldm")
    assert identity.facts["text_encoders"][0]["architecture"] == "openclip"


def test_vaes_in_both_conventions(ldm_checkpoint):
    ldm_vae = _strip(ldm_checkpoint("sd1"), VAE)
    for tensors, convention in ((tiny_vae().state_dict(), "diffusers"), (ldm_vae, "ldm")):
        identity = identify(model_from_tensors(tensors))
        assert (identity.kind, identity.key_convention, identity.family) == ("vae", convention, "unknown")
        assert {"sd1", "sd2", "sdxl-base"} <= set(identity.facts["compatible_families"])
        assert identity.facts["latent_channels"] == 4
        assert identity.nonstandard  # 32-wide, released VAEs are 128-wide
    flux_like = identify(model_from_tensors(tiny_vae(latent_channels=16).state_dict()))
    assert flux_like.facts["compatible_families"] == ["sd3", "flux", "chroma"]


def test_vae_family_from_modelspec():
    model = model_from_tensors(tiny_vae().state_dict(),
                               metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    assert identify(model).family == "sdxl-base"


@pytest.mark.parametrize("layout, family", [("sd1", "sd1"), ("sdxl", "sdxl-base")])
def test_diffusers_controlnet(layout, family):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(tiny_unet(layout))
    identity = identify(model_from_tensors(controlnet.state_dict()))
    assert (identity.kind, identity.family, identity.key_convention) == ("controlnet", family, "diffusers")
    assert identity.components == ["controlnet"]


# ---- full-size decisive keys (header only) -----------------------------------------------

def _ldm_vae(latent: int = 4) -> dict[str, torch.Tensor]:
    tensors = {VAE + "encoder.conv_in.weight": empty(128, 3, 3, 3),
               VAE + "decoder.conv_in.weight": empty(512, latent, 3, 3)}
    tensors.update({VAE + f"decoder.up.{i}.block.0.conv1.weight": empty(128, 128, 3, 3) for i in range(4)})
    return tensors


def _ldm_unet(channels: int, in_channels: int, context: int, levels: int, linear: bool,
              attn_block: int = 1, adm: int | None = None) -> dict[str, torch.Tensor]:
    tensors = {
        UNET + "input_blocks.0.0.weight": empty(channels, in_channels, 3, 3),
        UNET + "time_embed.0.weight": empty(4 * channels, channels),
        UNET + f"input_blocks.{attn_block}.1.proj_in.weight":
            empty(channels, channels) if linear else empty(channels, channels, 1, 1),
        UNET + f"input_blocks.{attn_block}.1.transformer_blocks.0.attn2.to_k.weight": empty(channels, context),
    }
    for level in range(1, levels):
        tensors[UNET + f"input_blocks.{3 * level}.0.op.weight"] = empty(channels, channels, 3, 3)
    if adm:
        tensors[UNET + "label_emb.0.0.weight"] = empty(4 * channels, adm)
    return tensors


def _hf_clip(prefix: str, width: int, layers: int = 12) -> dict[str, torch.Tensor]:
    tensors = {prefix + "text_model.embeddings.token_embedding.weight": empty(49408, width)}
    tensors.update({prefix + f"text_model.encoder.layers.{i}.self_attn.q_proj.weight": empty(width, width)
                    for i in range(layers)})
    return tensors


def _openclip(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    tensors = {prefix + "token_embedding.weight": empty(49408, width)}
    tensors.update({prefix + f"transformer.resblocks.{i}.attn.in_proj_weight": empty(3 * width, width)
                    for i in range(layers)})
    return tensors


def sd15(in_channels: int = 4) -> dict[str, torch.Tensor]:
    return {**_ldm_unet(320, in_channels, 768, 4, linear=False), **_ldm_vae(),
            **_hf_clip("cond_stage_model.transformer.", 768),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


def sd21(bias_std: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    bias = torch.randn(320, generator=generator) * bias_std
    return {**_ldm_unet(320, 4, 1024, 4, linear=True), **_ldm_vae(),
            **_openclip("cond_stage_model.model.", 1024, 23),
            UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias": bias}


def sdxl_base() -> dict[str, torch.Tensor]:
    return {**_ldm_unet(320, 4, 2048, 3, linear=True, attn_block=4, adm=2816), **_ldm_vae(),
            **_hf_clip("conditioner.embedders.0.transformer.", 768),
            **_openclip("conditioner.embedders.1.model.", 1280, 32)}


def test_full_size_sd15_checkpoint():
    identity = identify(model_from_tensors(sd15()))
    assert (identity.kind, identity.family, identity.variant) == ("checkpoint", "sd1", "normal")
    assert not identity.nonstandard
    assert identity.prediction == "epsilon"
    assert identity.precision.dominant == "F16"
    assert identity.facts["unet_channels"] == 320 and identity.facts["context_dim"] == 768


def test_full_size_nai_style_text_encoder_without_text_model_level():
    tensors = {k.replace("text_model.", ""): t for k, t in sd15().items()}
    identity = identify(model_from_tensors(tensors))
    assert identity.family == "sd1" and not identity.nonstandard
    assert identity.facts["text_encoders"][0]["text_model_level"] is False


def test_full_size_inpainting():
    identity = identify(model_from_tensors(sd15(in_channels=9)))
    assert (identity.family, identity.variant) == ("sd1", "inpaint")


@pytest.mark.parametrize("bias_std, prediction", [(0.2, "v"), (0.01, "epsilon")])
def test_sd2_prediction_by_comfyui_weight_test(bias_std, prediction):
    identity = identify(model_from_tensors(sd21(bias_std)))
    assert (identity.kind, identity.family, identity.nonstandard) == ("checkpoint", "sd2", False)
    assert identity.prediction == prediction
    assert "output_blocks.11.1.transformer_blocks.0.norm1.bias" in identity.prediction_evidence


def test_metadata_prediction_outranks_the_weight_test():
    model = model_from_tensors(sd21(0.01), metadata={"modelspec.prediction_type": "v"})
    identity = identify(model)
    assert (identity.prediction, identity.prediction_evidence) == ("v", "modelspec.prediction_type")


def test_full_size_sdxl_base_and_v_pred_marker():
    identity = identify(model_from_tensors(sdxl_base()))
    assert (identity.family, identity.nonstandard, identity.prediction) == ("sdxl-base", False, "epsilon")
    assert identity.components == ["unet", "vae", "text_encoder", "text_encoder_2"]
    marked = identify(model_from_tensors({**sdxl_base(), "v_pred": torch.tensor([])}))
    assert marked.prediction == "v"


def test_full_size_sdxl_refiner():
    tensors = {**_ldm_unet(384, 4, 1280, 4, linear=True, attn_block=4, adm=2560), **_ldm_vae(),
               **_openclip("conditioner.embedders.0.model.", 1280, 32)}
    identity = identify(model_from_tensors(tensors))
    assert (identity.family, identity.nonstandard) == ("sdxl-refiner", False)
    assert identity.components == ["unet", "vae", "text_encoder_2"]


def test_full_size_playground_and_kolors():
    playground = {**sdxl_base(), "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    assert identify(model_from_tensors(playground)).family == "playground-v2.5"
    kolors = {**_ldm_unet(320, 4, 2048, 3, linear=True, attn_block=4, adm=5632),
              UNET + "encoder_hid_proj.weight": empty(2048, 4096)}
    identity = identify(model_from_tensors(kolors))
    assert (identity.kind, identity.family, identity.nonstandard) == ("unet", "kolors", False)


def test_full_size_sd3_checkpoint():
    tensors = {UNET + "x_embedder.proj.weight": empty(1536, 16, 2, 2),
               UNET + "context_embedder.weight": empty(1536, 4096),
               UNET + "y_embedder.mlp.0.weight": empty(1536, 2048),
               **{UNET + f"joint_blocks.{i}.context_block.attn.qkv.weight": empty(4608, 1536) for i in range(24)},
               **_ldm_vae(latent=16),
               **_hf_clip("text_encoders.clip_l.transformer.", 768),
               **_hf_clip("text_encoders.clip_g.transformer.", 1280, 32),
               "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight": empty(32128, 4096),
               "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": empty(4096, 4096)}
    identity = identify(model_from_tensors(tensors))
    assert (identity.kind, identity.family, identity.nonstandard) == ("checkpoint", "sd3", False)
    assert identity.components == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]


def test_full_size_ldm_controlnet():
    tensors = {k.replace(UNET, "control_model."): t
               for k, t in _ldm_unet(320, 4, 768, 4, linear=False).items()}
    tensors["control_model.input_hint_block.0.weight"] = empty(16, 3, 3, 3)
    tensors["control_model.zero_convs.0.0.weight"] = empty(320, 320, 1, 1)
    identity = identify(model_from_tensors(tensors))
    assert (identity.kind, identity.family, identity.key_convention, identity.nonstandard) == (
        "controlnet", "sd1", "ldm", False)


def test_full_size_vae_is_standard():
    identity = identify(model_from_tensors(_strip(_ldm_vae(), VAE)))
    assert identity.kind == "vae" and not identity.nonstandard


# ---- notes: EMA, position ids, NaN, precision, metadata ------------------------------------

def test_ema_weights_are_noted(ldm_checkpoint):
    tensors = ldm_checkpoint("sd1")
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.diffusion_modelinput_blocks00weight"] = tensors[UNET + "input_blocks.0.0.weight"]
    identity = identify(model_from_tensors(tensors))
    assert identity.facts["has_ema"] and identity.facts["ema_tensors"] == 1
    assert any(n.startswith("EMA weights present") for n in identity.notes)
    assert not identify(model_from_tensors(ldm_checkpoint("sd1"))).facts["has_ema"]


@pytest.mark.parametrize("position_ids, broken", [
    (torch.arange(77)[None], False),
    (torch.arange(77, dtype=torch.float32)[None], True),
    (torch.arange(77)[None] * 1.0 + torch.linspace(0, 0.4, 77), True),
    (torch.arange(77)[None].flip(-1), True),
])
def test_broken_position_ids(position_ids, broken):
    tensors = sd15()
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    identity = identify(model_from_tensors(tensors))
    assert ("broken_position_ids" in identity.facts) == broken
    assert any("broken CLIP position_ids" in n for n in identity.notes) == broken


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float32, torch.float16,
                                   torch.bfloat16])
def test_position_ids_read_from_the_file_match_the_loaded_tensor(dtype, tmp_path):
    # a file's position ids are read from its bytes (no torch); in memory, through torch
    ramp = torch.arange(77)[None]
    for values in (ramp, ramp.flip(-1), ramp.clamp(max=70)):
        tensors = {"cond_stage_model.transformer.text_model.embeddings.position_ids": values.to(dtype)}
        save_file(tensors, str(tmp_path / "clip.safetensors"))
        with open_model(tmp_path / "clip.safetensors") as model:
            from_file = broken_position_ids(model)
        assert from_file == broken_position_ids(model_from_tensors(tensors))
        assert bool(from_file) == (dtype.is_floating_point or not torch.equal(values, ramp))


def test_inspecting_a_safetensors_file_does_not_import_torch(ldm_checkpoint, tmp_path):
    tensors = ldm_checkpoint("sd1")
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    script = ("import sys; from sdkit.inspect import inspect_path; "
              f"report = inspect_path({str(tmp_path / 'model.safetensors')!r}); "
              "assert 'broken_position_ids' in report['facts'], report; print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_nan_scan_only_when_deep(ldm_checkpoint):
    tensors = ldm_checkpoint("sd1")
    bad = UNET + "out.2.weight"
    tensors[bad] = tensors[bad].clone()
    tensors[bad].view(-1)[3] = float("nan")
    tensors[VAE + "decoder.conv_in.bias"] = torch.full_like(tensors[VAE + "decoder.conv_in.bias"], float("inf"))
    shallow = identify(model_from_tensors(tensors))
    assert "nan_tensors" not in shallow.facts
    deep = identify(model_from_tensors(tensors), deep=True)
    assert sorted(deep.facts["nan_tensors"]) == sorted([bad, VAE + "decoder.conv_in.bias"])
    assert any("2 tensors hold NaN/Inf" in n for n in deep.notes)
    clean = identify(model_from_tensors(ldm_checkpoint("sd1")), deep=True)
    assert clean.facts["nan_tensors"] == []


def test_precision_per_component(ldm_checkpoint):
    tensors = {k: (t.half() if k.startswith(UNET) else t) for k, t in ldm_checkpoint("sd1").items()}
    precision = identify(model_from_tensors(tensors)).precision
    assert precision.components["unet"] == "F16"
    assert precision.components["vae"] == precision.components["text_encoder"] == "F32"
    unet_numel = sum(t.numel() for k, t in tensors.items() if k.startswith(UNET))
    other_numel = sum(t.numel() for k, t in tensors.items() if not k.startswith(UNET))
    assert precision.dominant == ("F16" if unet_numel > other_numel else "F32")


def test_metadata_notes_and_json(ldm_checkpoint):
    import json

    metadata = {"modelspec.title": "Tiny", "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.trigger_phrase": "tinystyle, shapes"}
    identity = identify(model_from_tensors(ldm_checkpoint("sd1"), metadata=metadata))
    assert identity.facts["trigger_words"] == ["tinystyle", "shapes"]
    assert identity.facts["modelspec"]["title"] == "Tiny"
    assert any(n.startswith("modelspec: title 'Tiny'") for n in identity.notes)
    assert json.loads(json.dumps(identity.to_json()))["family"] == "sd1"


def test_metadata_disagreeing_with_weights_is_noted(ldm_checkpoint):
    model = model_from_tensors(ldm_checkpoint("sd1"),
                               metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    identity = identify(model)
    assert identity.family == "sd1"
    assert any("says sdxl-base" in n for n in identity.notes)


def test_unknown_file():
    identity = identify(model_from_tensors({"foo.weight": torch.zeros(3, 3), "bar": torch.zeros(2, 2)}))
    assert identity.kind == "unknown" and identity.family == "unknown"
