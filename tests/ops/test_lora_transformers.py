"""Baking LoRAs into transformer denoisers (every family with a key map): a LoRA in either
naming bakes into a single-file and a diffusers base to the same weights, fused modules
cut over parts and parts into fused rows included; untouched tensors are copied byte for
byte; `sdkit lora check` / `bake` on these bases, and what they refuse."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cli_run import run_sdkit
from fixtures.families.released import TINY, tiny_tensors
from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import assert_close, converted, load, random_lora, relative_error, save

ROOT = "model.diffusion_model."


def bake(base, loras, out, **options):
    bake_loras(base, [AdapterInput(str(path)) for path in loras], out, BakeOptions(**options))
    return load(out)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
def test_one_lora_bakes_alike_into_both_conventions(family, naming, tmp_path):
    single = tiny_tensors(family, "ldm")
    diffusers = converted(single, "ldm_to_diffusers")
    lora = save(random_lora(single if naming == "kohya" else diffusers, naming), tmp_path / "lora.safetensors")
    baked_single = bake(save(single, tmp_path / "single.safetensors"), [lora], tmp_path / "a.safetensors")
    baked_diffusers = bake(save(diffusers, tmp_path / "diffusers.safetensors"), [lora], tmp_path / "b.safetensors")
    assert_close(converted(baked_single, "ldm_to_diffusers"), baked_diffusers)
    changed = [k for k in diffusers if k.endswith(".weight") and diffusers[k].dim() == 2
               and not torch.equal(diffusers[k], baked_diffusers[k])]
    matrices = [k for k in diffusers if k.endswith(".weight") and diffusers[k].dim() == 2]
    assert changed == matrices  # every matrix got its delta


def test_fused_module_and_its_parts_bake_the_same_rows(tmp_path):
    """kohya's fused qkv module with a block-diagonal up factor is q, k and v LoRAs."""
    base = tiny_tensors("flux", "ldm")
    gen = torch.Generator().manual_seed(1)
    downs = [torch.randn(2, 32, generator=gen) for _ in range(3)]
    ups = [torch.randn(32, 2, generator=gen) for _ in range(3)]
    fused = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(downs),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.block_diag(*ups),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(6.0)}
    parts = {}
    for part, down, up in zip(("to_q", "to_k", "to_v"), downs, ups):
        parts[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = down
        parts[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = up
    base_path = save(base, tmp_path / "base.safetensors")
    one = bake(base_path, [save(fused, tmp_path / "fused.safetensors")], tmp_path / "one.safetensors")
    three = bake(base_path, [save(parts, tmp_path / "parts.safetensors")], tmp_path / "three.safetensors")
    assert relative_error(one["double_blocks.0.img_attn.qkv.weight"], three["double_blocks.0.img_attn.qkv.weight"]) < 1e-6
    expected = base["double_blocks.0.img_attn.qkv.weight"] + torch.cat([u @ d for u, d in zip(ups, downs)])
    assert relative_error(one["double_blocks.0.img_attn.qkv.weight"], expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_untouched_tensors_are_copied_byte_for_byte(dtype, tmp_path):
    base = {ROOT + k: v.to(dtype) for k, v in tiny_tensors("flux", "ldm").items()}
    base["vae.decoder.conv_in.weight"] = torch.ones(4, 4, 3, 3, dtype=dtype)  # a checkpoint's other parts
    base_path = save(base, tmp_path / "base.safetensors")
    lora = {"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 160),
            "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(32, 2)}
    out = tmp_path / "out.safetensors"
    baked = bake(base_path, [save(lora, tmp_path / "lora.safetensors")], out)
    touched = ROOT + "single_blocks.0.linear2.weight"
    with safe_open(str(base_path), "pt") as before, safe_open(str(out), "pt") as after:
        assert set(before.keys()) == set(after.keys())
    for key, value in base.items():
        assert baked[key].dtype == dtype
        if key != touched:
            assert baked[key].view(torch.int16).equal(value.view(torch.int16)), key
    expected = base[touched].float() + lora["lora_unet_single_blocks_0_linear2.lora_up.weight"] @ \
        lora["lora_unet_single_blocks_0_linear2.lora_down.weight"]
    assert relative_error(baked[touched], expected) < 1e-2


def test_dtype_option_and_a_lone_diffusers_folder(tmp_path):
    from fixtures.families.released import TINY as configs
    import diffusers

    class_name, config, _ = configs["flux"]
    torch.manual_seed(0)
    folder = tmp_path / "transformer"
    getattr(diffusers, class_name)(**config).save_pretrained(folder)
    lora = save({"transformer.proj_out.lora_A.weight": torch.randn(2, 32),
                 "transformer.proj_out.lora_B.weight": torch.randn(4, 2)}, tmp_path / "lora.safetensors")
    bake_loras(folder, [AdapterInput(str(lora))], tmp_path / "baked", BakeOptions(dtype="bf16"))
    baked = load(tmp_path / "baked" / "diffusion_pytorch_model.safetensors")
    assert {value.dtype for value in baked.values()} == {torch.bfloat16}
    assert (tmp_path / "baked" / "config.json").exists()


def test_block_weights_on_a_transformer(tmp_path):
    base = tiny_tensors("flux", "diffusers")
    lora = save(random_lora(base, "diffusers"), tmp_path / "lora.safetensors")
    out = bake(save(base, tmp_path / "base.safetensors"), [lora], tmp_path / "out.safetensors", blocks="S00:0")
    assert torch.equal(out["single_transformer_blocks.0.proj_out.weight"], base["single_transformer_blocks.0.proj_out.weight"])
    assert not torch.equal(out["transformer_blocks.0.attn.to_q.weight"], base["transformer_blocks.0.attn.to_q.weight"])


# ---- the commands ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformers")
    flux = tiny_tensors("flux", "ldm")
    lora = random_lora(flux, "kohya")
    lora["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    lora["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, 2)
    return {"flux": save(flux, folder / "flux.safetensors"),
            "sd3": save(tiny_tensors("sd3", "ldm"), folder / "sd3.safetensors"),
            "lora": save(random_lora(flux, "kohya"), folder / "lora.safetensors"),
            "partial": save(lora, folder / "partial.safetensors"),
            "dir": folder}


def test_check_reports_every_module_mapped(files, capsys):
    code, out, _ = run_sdkit(capsys, "lora", "check", str(files["flux"]), str(files["lora"]), "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "all" and report["mapped"] == report["modules"] > 0
    assert report["base_family"] == "flux" and report["base_convention"] == "ldm"


def test_check_says_loudly_when_only_a_part_maps(files, capsys):
    code, out, _ = run_sdkit(capsys, "lora", "check", str(files["flux"]), str(files["partial"]))
    out = " ".join(out.split())  # rich wraps lines
    assert code == 0
    assert "would be skipped" in out and "the base has no text_encoder" in out


def test_a_lora_of_another_family_is_refused_in_one_line(files, capsys, tmp_path):
    code, out, _ = run_sdkit(capsys, "lora", "check", str(files["sd3"]), str(files["lora"]))
    assert code == 1 and "NOT FOR THIS BASE: made for flux, the base is sd3" in " ".join(out.split())
    target = tmp_path / "out.safetensors"
    code, _, err = run_sdkit(capsys, "lora", "bake", str(files["sd3"]), str(files["lora"]), "-o", str(target))
    assert code == 1 and err.startswith("sdkit: error: ") and len(err.strip().splitlines()) == 1
    assert "made for flux" in err and not target.exists()
    # an adapter no metadata or layer width ties to a family: refused by its names
    lone = save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 7),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(7, 2)},
                tmp_path / "odd.safetensors")
    code, out, _ = run_sdkit(capsys, "lora", "check", str(files["sd3"]), str(lone))
    assert code == 1 and "NONE of the 1 modules fits this base" in " ".join(out.split())
    code, _, err = run_sdkit(capsys, "lora", "bake", str(files["sd3"]), str(lone), "-o", str(target))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "none of its 1 modules fits" in err


def test_bake_command_keeps_the_convention(files, capsys, tmp_path):
    target = tmp_path / "out.safetensors"
    code, _, err = run_sdkit(capsys, "lora", "bake", str(files["flux"]), str(files["lora"]), "-o", str(target),
                             "--to", "diffusers")
    assert code == 1 and "keeps its key convention" in err and not target.exists()
    code, out, _ = run_sdkit(capsys, "lora", "bake", str(files["flux"]), str(files["lora"]), "-o", str(target),
                             "--json")
    assert code == 0 and json.loads(out)["convention"] == "ldm"


def test_a_loha_on_a_fused_layer_is_cut_over_the_parts_too(tmp_path):
    single = tiny_tensors("flux", "ldm")
    diffusers = converted(single, "ldm_to_diffusers")
    gen = torch.Generator().manual_seed(2)
    name = "lora_unet_single_blocks_0_linear1"
    loha = {f"{name}.hada_w1_a": torch.randn(224, 2, generator=gen), f"{name}.hada_w1_b": torch.randn(2, 32, generator=gen),
            f"{name}.hada_w2_a": torch.randn(224, 2, generator=gen), f"{name}.hada_w2_b": torch.randn(2, 32, generator=gen),
            f"{name}.alpha": torch.tensor(1.0)}
    lora = save(loha, tmp_path / "loha.safetensors")
    baked_single = bake(save(single, tmp_path / "single.safetensors"), [lora], tmp_path / "a.safetensors")
    baked_diffusers = bake(save(diffusers, tmp_path / "diffusers.safetensors"), [lora], tmp_path / "b.safetensors")
    assert_close(converted(baked_single, "ldm_to_diffusers"), baked_diffusers)
    delta = (loha[f"{name}.hada_w1_a"] @ loha[f"{name}.hada_w1_b"]) * (loha[f"{name}.hada_w2_a"] @ loha[f"{name}.hada_w2_b"]) / 2
    expected = single["single_blocks.0.linear1.weight"] + delta
    assert relative_error(baked_single["single_blocks.0.linear1.weight"], expected) < 1e-5
    assert relative_error(baked_diffusers["single_transformer_blocks.0.proj_mlp.weight"], expected[96:]) < 1e-5


def test_text_encoder_modules_bake_into_an_all_in_one_checkpoint(tmp_path, capsys):
    """A ComfyUI all-in-one FLUX.1 checkpoint keeps CLIP-L and T5 under `text_encoders.`:
    kohya's `lora_te1_` (CLIP-L) and `lora_te3_` (T5, sd-scripts' name in every family) and
    diffusers' `text_encoder.` / `text_encoder_2.` (FLUX.1's T5) reach them."""
    from pathlib import Path

    toy = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
    aio = tmp_path / "aio.safetensors"
    parts = [toy / "toy-flux.safetensors", toy / "toy-flux.clip_l.safetensors", toy / "toy-flux.t5xxl.safetensors",
             toy / "ae.safetensors"]
    code, _out, err = run_sdkit(capsys, "join", *map(str, parts), "-o", str(aio))
    assert code == 0, err
    base = load(aio)
    gen = torch.Generator().manual_seed(3)
    modules = {  # module name -> the base weight it must change
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
        "text_encoder.text_model.encoder.layers.1.mlp.fc1":
            "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
        "text_encoder_2.encoder.block.1.layer.0.SelfAttention.v":
            "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.v.weight",
        "lora_unet_double_blocks_0_img_attn_proj": ROOT + "double_blocks.0.img_attn.proj.weight",
    }
    lora, expected = {}, {}
    for module, key in modules.items():
        rows, columns = base[key].shape
        down, up = torch.randn(2, columns, generator=gen) * 0.1, torch.randn(rows, 2, generator=gen) * 0.1
        if module.startswith("lora_"):
            lora.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                         f"{module}.alpha": torch.tensor(1.0)})  # scale 1/2
            expected[key] = base[key].float() + 0.5 * up @ down
        else:
            lora.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
            expected[key] = base[key].float() + up @ down
    path = save(lora, tmp_path / "lora.safetensors")
    code, text, err = run_sdkit(capsys, "lora", "check", str(aio), str(path), "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["mapped"] == report["modules"] == len(modules) and report["verdict"] == "all"
    baked = bake(aio, [path], tmp_path / "baked.safetensors")
    for key, value in baked.items():
        if key in expected:
            assert relative_error(value.float(), expected[key]) < 2e-3, key
            assert relative_error(value.float(), base[key].float()) > 2e-2, key  # the delta shows
        else:
            assert torch.equal(value, base[key]), key
