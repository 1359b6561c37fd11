"""`sdkit lora convert` of transformer LoRAs between the comfyui, kohya and diffusers
layouts: every layout bakes (`sdkit lora bake`, the judge) into the tiny base to the
weights the input bakes to; renamed factors are bit for bit the input's; q / k / v fused
and cut apart again give the input back; diffusers' own loader takes the diffusers output
with no missing or unexpected keys and fuses it to the same weights; diffusers' kohya
FLUX converter reads the kohya output alike; bad input is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from cli_run import run_sdkit
from fixtures.families.released import TINY, tiny_tensors
from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.errors import SdkitError
from sdkit.ops.lora.bake import AdapterInput, BakeOptions, bake_loras
from sdkit.ops.lora.convert import LoraConvertOptions, convert_transformer_lora
from test_lora_support import single_thread  # noqa: F401  (autouse)
from transformer_loras import assert_close, converted, kohya_layout, load, random_lora, save

LAYOUTS = ("comfyui", "kohya", "diffusers")


def bake(base, lora, out):
    bake_loras(base, [AdapterInput(str(lora))], out, BakeOptions())
    return load(out)


def convert(source, out, to, **options):
    convert_transformer_lora(source, out, LoraConvertOptions(to, **options))
    return out


@pytest.fixture(scope="module", params=["flux", "sd3"])
def tiny(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    single = tiny_tensors(family, "ldm")
    diffusers = converted(single, "ldm_to_diffusers")
    peft = random_lora(diffusers, "diffusers", rank=2, seed=3)
    peft = {k: v * 0.5 if k.endswith("lora_B.weight") else v for k, v in peft.items()}
    files = {"family": family, "dir": folder, "single": save(single, folder / "single.safetensors"),
             "diffusers-base": save(diffusers, folder / "diffusers.safetensors"),
             "diffusers": save(peft, folder / "peft.safetensors"),
             "kohya": save(random_lora(single, "kohya", rank=3, seed=4), folder / "kohya.safetensors")}
    files["reference"] = {name: bake(files["single"], files[name], folder / f"ref-{name}.safetensors")
                          for name in ("diffusers", "kohya")}
    return files


@pytest.mark.parametrize("source", ["diffusers", "kohya"])
@pytest.mark.parametrize("to", LAYOUTS)
def test_every_layout_bakes_to_the_same_weights(tiny, source, to):
    folder = tiny["dir"]
    out = convert(tiny[source], folder / f"{source}-to-{to}.safetensors", to, base=str(tiny["single"]))
    assert_close(bake(tiny["single"], out, folder / f"baked-{source}-{to}.safetensors"),
                 tiny["reference"][source], 1e-6)
    names = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in load(out)}
    prefix = {"comfyui": "diffusion_model.", "kohya": "lora_unet_", "diffusers": "transformer."}[to]
    assert all(name.startswith(prefix) for name in names)


@pytest.mark.parametrize("to", ["comfyui", "kohya"])
def test_round_trip_through_a_fused_layout_gives_the_factors_back(tiny, to):
    folder = tiny["dir"]
    there = convert(tiny["diffusers"], folder / f"there-{to}.safetensors", to, base=str(tiny["single"]))
    back = load(convert(there, folder / f"back-{to}.safetensors", "diffusers", base=str(tiny["single"])))
    original = load(tiny["diffusers"])
    assert set(back) == set(original)
    for key, value in original.items():  # ranks recovered from the block-diagonal up factor
        assert back[key].shape == value.shape and torch.equal(back[key], value), key


def test_renaming_copies_factors_bit_for_bit_and_keeps_metadata(tiny):
    folder = tiny["dir"]
    source = load(tiny["kohya"])
    marked = save(source, folder / "marked.safetensors", {"ss_network_dim": "3", "modelspec.title": "mine"})
    out = convert(marked, folder / "comfy.safetensors", "comfyui")
    comfy = load(out)
    assert {"diffusion_model." + k[len("lora_unet_"):] for k in source} != set()
    for key, value in source.items():
        module, _, suffix = key.partition(".")
        path = next(name for name in comfy if name.endswith("." + suffix) and
                    name[len("diffusion_model."): -len(suffix) - 1].replace(".", "_") == module[len("lora_unet_"):])
        assert torch.equal(comfy[path], value)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "3" and metadata["modelspec.title"] == "mine"
    assert json.loads(metadata["sdkit.recipe"])["operation"] == "lora-convert"


def test_without_a_base_the_family_and_sizes_come_from_the_lora(tmp_path):
    single = tiny_tensors("flux", "ldm")
    base = save(single, tmp_path / "base.safetensors")
    lora = save(random_lora(single, "kohya"), tmp_path / "lora.safetensors")
    with_base = load(convert(lora, tmp_path / "a.safetensors", "diffusers", base=str(base)))
    alone = load(convert(lora, tmp_path / "b.safetensors", "diffusers"))
    assert set(alone) == set(with_base) and all(torch.equal(alone[k], with_base[k]) for k in alone)


def test_diffusers_loads_the_diffusers_output_and_fuses_it_alike(tmp_path):
    import diffusers
    from peft.utils import get_peft_model_state_dict

    class_name, config, _ = TINY["flux"]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**config).eval()
    base = {name: value.clone() for name, value in model.state_dict().items()}
    single = converted(base, "diffusers_to_ldm")
    kohya = save(random_lora(single, "kohya", rank=2, seed=5), tmp_path / "kohya.safetensors")
    out = convert(kohya, tmp_path / "peft.safetensors", "diffusers")
    written = load(out)
    model.load_lora_adapter(str(out), prefix="transformer", adapter_name="x")
    loaded = {f"transformer.{k}" for k in get_peft_model_state_dict(model, adapter_name="x")}
    assert loaded == set(written)  # nothing missing, nothing unexpected
    model.fuse_lora(adapter_names=["x"])
    fused = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
             if "lora_" not in name}
    expected = bake(save(base, tmp_path / "base.safetensors"), kohya, tmp_path / "baked.safetensors")
    assert_close(fused, expected, 1e-5)


def test_diffusers_kohya_converter_reads_the_kohya_output_alike(tmp_path):
    """diffusers' kohya FLUX reader (double blocks: it cuts a single block's linear1 at
    the released widths) gets from sdkit's kohya file what sdkit bakes from it."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    single = tiny_tensors("flux", "ldm")
    diffusers = converted(single, "ldm_to_diffusers")
    peft = {k: v for k, v in random_lora(diffusers, "diffusers", seed=6).items() if "transformer_blocks" in k
            and not k.startswith("transformer.single_")}
    out = load(convert(save(peft, tmp_path / "peft.safetensors"), tmp_path / "kohya.safetensors", "kohya",
                       base=str(save(single, tmp_path / "single.safetensors"))))
    read = _convert_kohya_flux_lora_to_diffusers(dict(out))
    base = save(diffusers, tmp_path / "base.safetensors")
    assert_close(bake(base, save(read, tmp_path / "read.safetensors"), tmp_path / "a.safetensors"),
                 bake(base, save(peft, tmp_path / "p.safetensors"), tmp_path / "b.safetensors"), 1e-6)


def test_kohya_layout_of_the_peers_matches(tmp_path):
    """The fused modules sdkit writes are those of sd-scripts' state dicts (the helper
    `kohya_layout` builds them as `networks/lora_flux.py` stores them)."""
    single = tiny_tensors("flux", "ldm")
    diffusers = converted(single, "ldm_to_diffusers")
    peft = random_lora(diffusers, "diffusers", seed=7)
    expected = kohya_layout(peft, 1.0, single)
    out = load(convert(save(peft, tmp_path / "peft.safetensors"), tmp_path / "kohya.safetensors", "kohya",
                       base=str(save(single, tmp_path / "single.safetensors"))))
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert torch.equal(out[key].float(), value.float()), key


# ---- refusals ---------------------------------------------------------------------------------

def _refused(capsys, tmp_path, lora, *args):
    target = tmp_path / "out.safetensors"
    code, _, err = run_sdkit(capsys, "lora", "convert", str(lora), "-o", str(target), *args)
    assert code == 1 and err.startswith("sdkit: error: ") and len(err.strip().splitlines()) == 1, err
    assert not target.exists()
    return err


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    single = tiny_tensors("flux", "ldm")
    base = save(single, tmp_path / "flux.safetensors")
    good = random_lora(single, "kohya")
    nan = dict(good)
    nan["lora_unet_img_in.lora_up.weight"] = torch.full_like(nan["lora_unet_img_in.lora_up.weight"], float("nan"))
    err = _refused(capsys, tmp_path, save(nan, tmp_path / "nan.safetensors"), "--to", "comfyui")
    assert "lora_unet_img_in" in err and "NaN" in err
    odd = {**good, "lora_unet_nowhere_7.lora_down.weight": torch.zeros(2, 4),
           "lora_unet_nowhere_7.lora_up.weight": torch.zeros(4, 2)}
    assert "lora_unet_nowhere_7" in _refused(capsys, tmp_path, save(odd, tmp_path / "odd.safetensors"), "--to", "kohya")
    wide = {**good, "lora_unet_img_in.lora_down.weight": torch.zeros(2, 9)}
    err = _refused(capsys, tmp_path, save(wide, tmp_path / "wide.safetensors"), "--to", "kohya", "--base", str(base))
    assert "lora_unet_img_in" in err
    sd3 = save(tiny_tensors("sd3", "ldm"), tmp_path / "sd3.safetensors")
    err = _refused(capsys, tmp_path, save(good, tmp_path / "good.safetensors"), "--to", "kohya", "--base", str(sd3))
    assert "flux" in err
    twice = {**good, "transformer.x_embedder.lora_A.weight": torch.zeros(2, 4),
             "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)}
    assert "same layer" in _refused(capsys, tmp_path, save(twice, tmp_path / "twice.safetensors"), "--to", "kohya")


def test_other_algorithms_are_renamed_or_refused(tmp_path):
    single = tiny_tensors("flux", "ldm")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    loha = save({f"{name}.hada_w1_a": torch.randn(96, 2), f"{name}.hada_w1_b": torch.randn(2, 32),
                 f"{name}.hada_w2_a": torch.randn(96, 2), f"{name}.hada_w2_b": torch.randn(2, 32),
                 f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "loha.safetensors")
    comfy = load(convert(loha, tmp_path / "comfy.safetensors", "comfyui"))
    assert set(comfy) == {f"diffusion_model.double_blocks.0.img_attn.qkv.{s}" for s in
                          ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    with pytest.raises(SdkitError, match="plain LoRA"):
        convert(loha, tmp_path / "peft.safetensors", "diffusers")
    assert not (tmp_path / "peft.safetensors").exists()
    assert single  # the base is not needed for either


def test_the_command_and_the_convert_alias(tmp_path, capsys):
    single = tiny_tensors("flux", "ldm")
    lora = save(random_lora(single, "kohya"), tmp_path / "lora.safetensors")
    code, out, _ = run_sdkit(capsys, "lora", "convert", str(lora), "--to", "diffusers", "-o",
                             str(tmp_path / "a.safetensors"), "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "flux" and report["split"] > 0
    code, _, _ = run_sdkit(capsys, "convert", str(lora), "--to", "diffusers", "-o", str(tmp_path / "b.safetensors"))
    assert code == 0 and load(tmp_path / "a.safetensors").keys() == load(tmp_path / "b.safetensors").keys()


# ---- merge and resize of transformer LoRAs ----------------------------------------------------

def test_merge_meets_every_trainer_on_one_layer_and_bakes_as_both(tmp_path):
    """A peft LoRA (q, k, v apart) and a kohya one (fused qkv) merge exactly: the merged
    LoRA bakes to what the two bake to together."""
    from sdkit.ops.lora.merge import MergeOptions, merge_loras

    single = tiny_tensors("flux", "ldm")
    base = save(single, tmp_path / "base.safetensors")
    peft = save(random_lora(converted(single, "ldm_to_diffusers"), "diffusers", seed=8), tmp_path / "a.safetensors")
    kohya = save(random_lora(single, "kohya", seed=9), tmp_path / "b.safetensors")
    for extra in ({}, {"base": str(base)}):
        out = tmp_path / f"merged{len(extra)}.safetensors"
        merge_loras([AdapterInput(str(peft), 0.5), AdapterInput(str(kohya))], out, MergeOptions(**extra),
                    overwrite=True)
        assert all(k.startswith("lora_unet_") for k in load(out))
        both = tmp_path / f"both{len(extra)}.safetensors"
        bake_loras(base, [AdapterInput(str(peft), 0.5), AdapterInput(str(kohya))], both, BakeOptions())
        assert_close(bake(base, out, tmp_path / f"one{len(extra)}.safetensors"), load(both), 1e-6)


def test_resize_keeps_the_top_singular_directions(tmp_path):
    from sdkit.ops.lora.extract import ResizeOptions, resize_lora

    single = tiny_tensors("sd3", "ldm")
    base = save(single, tmp_path / "base.safetensors")
    lora = random_lora(converted(single, "ldm_to_diffusers"), "diffusers", rank=4, seed=10)
    source = save(lora, tmp_path / "peft.safetensors")
    out = tmp_path / "r2.safetensors"
    resize_lora(source, out, ResizeOptions(rank=2, base=str(base)))
    resized = load(out)
    up = lora["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"]
    down = lora["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"]
    u, s, vh = torch.linalg.svd(up @ down)
    best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 delta
    name = "lora_unet_joint_blocks_0_x_block_attn_proj"
    scale = resized[f"{name}.alpha"] / resized[f"{name}.lora_down.weight"].shape[0]
    delta = resized[f"{name}.lora_up.weight"] @ resized[f"{name}.lora_down.weight"] * scale
    assert float((delta - best).abs().max() / best.abs().max()) < 1e-5
