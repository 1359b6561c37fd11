"""`lora extract` of the text encoders a transformer checkpoint holds (ComfyUI's all-in-one
layout: `text_encoders.clip_l.transformer.…`, `text_encoders.t5xxl.transformer.…` beside
`model.diffusion_model.`): TUNED is toy-flux's all-in-one checkpoint (in float32) plus a
known rank-2 delta on the CLIP-L and T5 layers sd-scripts adapts and on a block of the
diffusion model; extracted at rank 4 without a clamp, the LoRA baked back into the base
must give TUNED (within 1e-5 relative), in every layout, under kohya's `lora_te1_` /
`lora_te3_` names where the layout is kohya's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import assert_close, load, save

from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from sdkit.ops.lora.extract import ExtractOptions, extract_lora
from sdkit.ops.parts.join import join_parts

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
EXACT = {"rank": 4, "clamp_quantile": None}
# the layers sd-scripts' networks adapt: CLIP attention / MLP, T5 attention / feed-forward,
# and (for the diffusion model) a block matrix
ADAPTED = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|SelfAttention\.[qkvo]|DenseReluDense\.w\w+|"
                     r"double_blocks\.0\.img_attn\.proj)\.weight$")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aio")
    joined = folder / "joined.safetensors"
    parts = [TOY / "toy-flux.safetensors", TOY / "toy-flux.clip_l.safetensors", TOY / "toy-flux.t5xxl.safetensors",
             TOY / "ae.safetensors"]
    join_parts(parts, joined)
    base = {name: value.float() for name, value in load(joined).items()}
    generator = torch.Generator().manual_seed(4)
    tuned = dict(base)
    for name, value in base.items():
        if ADAPTED.search(name) and value.dim() == 2:
            rows, columns = value.shape
            tuned[name] = value + (torch.randn(rows, 2, generator=generator) @ torch.randn(2, columns, generator=generator)) * 0.1
    return {"dir": folder, "base_values": base, "tuned_values": tuned,
            "base": save(base, folder / "base.safetensors"), "tuned": save(tuned, folder / "tuned.safetensors")}


def extracted(checkpoints, to, tuned="tuned", **options):
    out = checkpoints["dir"] / f"{to}-{tuned}.safetensors"
    report = extract_lora(checkpoints[tuned], checkpoints["base"], out, ExtractOptions(**EXACT, to=to, **options),
                          overwrite=True)
    return out, report


@pytest.mark.parametrize("to", ["comfyui", "kohya", "diffusers"])
def test_text_encoders_extract_and_bake_back_to_the_tuned_checkpoint(checkpoints, to, tmp_path):
    lora, _ = extracted(checkpoints, to)
    bake_loras(checkpoints["base"], [AdapterInput(str(lora))], tmp_path / "baked.safetensors", BakeOptions())
    assert_close(load(tmp_path / "baked.safetensors"), checkpoints["tuned_values"])


def test_kohya_names_the_encoders_as_sd_scripts_does(checkpoints):
    lora, _ = extracted(checkpoints, "kohya")
    modules = {key.split(".")[0] for key in load(lora)}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in modules
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in modules
    assert "lora_unet_double_blocks_0_img_attn_proj" in modules
    peft, _ = extracted(checkpoints, "diffusers")
    names = set(load(peft))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight" in names  # FLUX.1's T5


def test_an_unchanged_encoder_is_left_out_with_a_note(checkpoints):
    tuned = {name: (checkpoints["base_values"][name] if "t5xxl" in name else value)
             for name, value in checkpoints["tuned_values"].items()}
    save(tuned, checkpoints["dir"] / "clip-only.safetensors")
    checkpoints["clip_only"] = checkpoints["dir"] / "clip-only.safetensors"
    lora, report = extracted(checkpoints, "kohya", tuned="clip_only")
    modules = {key.split(".")[0] for key in load(lora)}
    assert any(m.startswith("lora_te1_") for m in modules) and not any(m.startswith("lora_te3_") for m in modules)
    assert any(note.startswith("T5-XXL left out") for note in report.notes), report.notes


@pytest.mark.parametrize("encoder,prefix,inside", [("t5xxl", "lora_te3_", "text_encoders.t5xxl.transformer."),
                                                   ("clip_l", "lora_te_", "text_encoders.clip_l.transformer.")])
def test_a_lone_text_encoder_extracts_and_bakes_into_itself_and_the_checkpoint(checkpoints, encoder, prefix, inside,
                                                                            tmp_path):
    """Lone encoder files (as FLUX and SD3 users keep them): T5-XXL under kohya's
    `lora_te3_` (its name in every family), CLIP-L as sd-scripts names a lone CLIP-L;
    baked back into the lone file and into the all-in-one checkpoint's copy of it."""
    base = {name[len(inside):]: value for name, value in checkpoints["base_values"].items() if name.startswith(inside)}
    tuned = {name[len(inside):]: value for name, value in checkpoints["tuned_values"].items()
             if name.startswith(inside)}
    base_path, tuned_path = save(base, tmp_path / "base.safetensors"), save(tuned, tmp_path / "tuned.safetensors")
    lora = tmp_path / "lora.safetensors"
    extract_lora(tuned_path, base_path, lora, ExtractOptions(**EXACT))
    assert all(key.startswith(prefix) for key in load(lora))
    bake_loras(base_path, [AdapterInput(str(lora))], tmp_path / "lone.safetensors", BakeOptions())
    assert_close(load(tmp_path / "lone.safetensors"), tuned)
    bake_loras(checkpoints["base"], [AdapterInput(str(lora))], tmp_path / "aio.safetensors", BakeOptions())
    expected = {**checkpoints["base_values"], **{inside + name: value for name, value in tuned.items()}}
    assert_close(load(tmp_path / "aio.safetensors"), expected)


def test_a_lone_t5_in_the_diffusers_layout_is_refused_in_one_line(checkpoints, tmp_path):
    from sdkit.errors import SdkitError

    inside = "text_encoders.t5xxl.transformer."
    base = save({n[len(inside):]: v for n, v in checkpoints["base_values"].items() if n.startswith(inside)},
                tmp_path / "base.safetensors")
    tuned = save({n[len(inside):]: v for n, v in checkpoints["tuned_values"].items() if n.startswith(inside)},
                 tmp_path / "tuned.safetensors")
    with pytest.raises(SdkitError, match="lone T5 encoder"):
        extract_lora(tuned, base, tmp_path / "out.safetensors", ExtractOptions(**EXACT, to="diffusers"))
    assert not (tmp_path / "out.safetensors").exists()
