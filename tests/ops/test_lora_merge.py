"""Merging LoRAs: exact concatenation, SVD re-factorisation (with kohya's clamp), LyCORIS
modules, mixed kohya / diffusers naming, the diffusers output format, and the
`sdkit lora merge / extract / resize` commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from sdkit.cli import lora_cmd  # noqa: F401  (attaches `lora` to the group)
from sdkit.cli.main import main
from sdkit.errors import SdkitError
from sdkit.ops.lora.bake import AdapterInput, bake_loras
from sdkit.ops.lora.merge import MergeOptions, merge_loras
from test_lora_support import single_thread  # noqa: F401  (autouse)
from test_lora_support import (diffusers_state, kohya_lora, lora_delta, peft_lora_file, read_folder, save_folder,
                               tiny_pipeline, write)

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SHAPES = {CONV: (32, 32, 3, 3), PROJ: (32, 32, 1, 1), TO_Q: (32, 32)}


def two_loras(tmp_path):
    a = kohya_lora([(CONV, SHAPES[CONV]), (PROJ, SHAPES[PROJ])], rank=4, alpha=2, seed=1)
    b = kohya_lora([(PROJ, SHAPES[PROJ]), (TO_Q, SHAPES[TO_Q])], rank=2, alpha=8, seed=2)
    return a, b, write(tmp_path / "a.safetensors", a), write(tmp_path / "b.safetensors", b)


def merged_delta(state: dict, name: str) -> torch.Tensor:
    return lora_delta(state, name).reshape(SHAPES[name])


def test_concatenation_is_exact(tmp_path):
    a, b, path_a, path_b = two_loras(tmp_path)
    out = tmp_path / "ab.safetensors"
    result = merge_loras([AdapterInput(str(path_a), 0.6), AdapterInput(str(path_b), -0.3)], out,
                         MergeOptions(dtype="fp32"))
    merged = load_file(str(out))
    assert result.method == "concat" and result.ranks == {CONV: 4, PROJ: 6, TO_Q: 2}
    torch.testing.assert_close(merged_delta(merged, CONV), 0.6 * merged_delta(a, CONV))
    torch.testing.assert_close(merged_delta(merged, PROJ), 0.6 * merged_delta(a, PROJ) - 0.3 * merged_delta(b, PROJ))
    torch.testing.assert_close(merged_delta(merged, TO_Q), -0.3 * merged_delta(b, TO_Q))
    assert merged[f"{PROJ}.lora_down.weight"].shape == (6, 32, 1, 1)


def test_svd_merge_is_the_best_low_rank_sum(tmp_path):
    a, b, path_a, path_b = two_loras(tmp_path)
    inputs = [AdapterInput(str(path_a), 1.0), AdapterInput(str(path_b), 0.5)]
    plain = merge_loras(inputs, tmp_path / "svd.safetensors", MergeOptions(rank=3, dtype="fp32"))
    merged = load_file(str(tmp_path / "svd.safetensors"))
    total = merged_delta(a, PROJ) + 0.5 * merged_delta(b, PROJ)
    u, s, vh = torch.linalg.svd(total.flatten(1))
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(merged_delta(merged, PROJ).flatten(1), best, rtol=1e-4, atol=1e-6)
    assert plain.retained[PROJ] == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
    merge_loras(inputs, tmp_path / "clamped.safetensors", MergeOptions(rank=3, clamp_quantile=0.9, dtype="fp32"))
    clamped = load_file(str(tmp_path / "clamped.safetensors"))
    up, down = u[:, :3] * s[:3], vh[:3]
    bound = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9))
    factors = torch.cat([clamped[f"{PROJ}.lora_up.weight"].flatten(), clamped[f"{PROJ}.lora_down.weight"].flatten()])
    assert float(factors.abs().max()) == pytest.approx(bound, rel=1e-4)


def loha(name: str, shape: tuple[int, int], rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out, inp = shape
    return {f"{name}.hada_w1_a": torch.randn(out, rank, generator=generator) * 0.3,
            f"{name}.hada_w1_b": torch.randn(rank, inp, generator=generator) * 0.3,
            f"{name}.hada_w2_a": torch.randn(out, rank, generator=generator) * 0.3,
            f"{name}.hada_w2_b": torch.randn(rank, inp, generator=generator) * 0.3,
            f"{name}.alpha": torch.tensor(alpha)}


def test_lycoris_modules_need_a_rank(tmp_path):
    state = loha(TO_Q, SHAPES[TO_Q], rank=2, alpha=1, seed=7)
    lycoris = write(tmp_path / "loha.safetensors", state, {"ss_network_module": "lycoris.kohya"})
    _, b, _, path_b = two_loras(tmp_path)
    inputs = [AdapterInput(str(lycoris), 0.5), AdapterInput(str(path_b), 1.0)]
    with pytest.raises(SdkitError, match="a loha module cannot be concatenated exactly; give --rank"):
        merge_loras(inputs, tmp_path / "x.safetensors")
    merge_loras(inputs, tmp_path / "m.safetensors", MergeOptions(rank=32, dtype="fp32"))
    merged = load_file(str(tmp_path / "m.safetensors"))
    halves = (state[f"{TO_Q}.hada_w1_a"] @ state[f"{TO_Q}.hada_w1_b"]) * (state[f"{TO_Q}.hada_w2_a"] @ state[f"{TO_Q}.hada_w2_b"])
    expected = 0.5 * halves * (1 / 2) + merged_delta(b, TO_Q)
    torch.testing.assert_close(merged_delta(merged, TO_Q), expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("merge_sd1")
    pipe = tiny_pipeline("sd1")
    return {"pipe": pipe, "folder": save_folder(pipe, folder / "base"), "peft": peft_lora_file(pipe, folder / "peft")}


def kohya_for(pipe, seed: int) -> dict[str, torch.Tensor]:
    """kohya-named modules on the layers the peft adapter also targets (and one more)."""
    modules = [("lora_unet_" + name.replace(".", "_"), tuple(layer.weight.shape))
               for name, layer in pipe.unet.named_modules() if name.endswith(("attn2.to_k", "proj_out"))]
    modules += [("lora_te_text_model_" + name.replace(".", "_"), tuple(layer.weight.shape))
                for name, layer in pipe.text_encoder.named_modules() if name.endswith("self_attn.q_proj")]
    return kohya_lora(modules, rank=3, alpha=1.5, seed=seed)


def test_kohya_and_diffusers_names_merge_onto_the_same_layers(sd1, tmp_path):
    kohya = write(tmp_path / "k.safetensors", kohya_for(sd1["pipe"], 9))
    inputs = [AdapterInput(str(sd1["peft"]), 0.8), AdapterInput(str(kohya), 0.5)]
    merged = tmp_path / "merged.safetensors"
    result = merge_loras(inputs, merged, MergeOptions(dtype="fp32"))
    assert any(rank == 7 for rank in result.ranks.values())  # 4 (peft) + 3 (kohya) on shared layers
    bake_loras(sd1["folder"], [AdapterInput(str(merged))], tmp_path / "one")
    bake_loras(sd1["folder"], inputs, tmp_path / "two")
    one, two = read_folder(tmp_path / "one"), read_folder(tmp_path / "two")
    for key in two:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6, msg=key)


def test_diffusers_format_loads_in_diffusers(sd1, tmp_path):
    kohya = write(tmp_path / "k.safetensors", kohya_for(sd1["pipe"], 11))
    inputs = [AdapterInput(str(sd1["peft"]), 0.8), AdapterInput(str(kohya), 0.5)]
    out = tmp_path / "merged_diffusers.safetensors"
    merge_loras(inputs, out, MergeOptions(base=str(sd1["folder"]), format="diffusers", dtype="fp32"))
    assert all(key.startswith(("unet.", "text_encoder.")) and ".lora_" in key for key in load_file(str(out)))
    pipe = copy.deepcopy(sd1["pipe"])
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    bake_loras(sd1["folder"], inputs, tmp_path / "baked")
    ours, theirs = read_folder(tmp_path / "baked"), diffusers_state(pipe)
    for key, value in theirs.items():
        if key in ours:
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_merging_different_families_is_refused(tmp_path):
    _, _, path_a, path_b = two_loras(tmp_path)
    xl = write(tmp_path / "xl.safetensors", load_file(str(path_b)), {"ss_base_model_version": "sdxl_base_v1-0"})
    sd = write(tmp_path / "sd.safetensors", load_file(str(path_a)), {"ss_base_model_version": "sd_v1"})
    with pytest.raises(SdkitError, match="made for sdxl-base"):
        merge_loras([AdapterInput(str(sd)), AdapterInput(str(xl))], tmp_path / "x.safetensors")


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(["lora", *args])
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_commands(sd1, tmp_path, capsys):
    _, _, path_a, path_b = two_loras(tmp_path)
    merged = tmp_path / "m.safetensors"
    code, out, _ = run(capsys, "merge", f"{path_a}:0.5", str(path_b), "-o", str(merged), "--rank", "2", "--json")
    assert code == 0 and json.loads(out)["method"] == "svd" and merged.is_file()
    code, out, _ = run(capsys, "resize", str(merged), "-o", str(tmp_path / "r.safetensors"),
                       "--dynamic", "sv_fro", "0.9", "--rank", "2", "--json")
    assert code == 0 and all(layer["rank"] <= 2 for layer in json.loads(out)["layers"])
    tuned = copy.deepcopy(sd1["pipe"])
    with torch.no_grad():
        for parameter in tuned.unet.parameters():
            parameter.add_(0.01)
    tuned_folder = save_folder(tuned, tmp_path / "tuned")
    code, out, _ = run(capsys, "extract", str(tuned_folder), str(sd1["folder"]), "-o", str(tmp_path / "e.safetensors"),
                       "--rank", "2")
    assert code == 0 and "energy retained" in out
    code, _, err = run(capsys, "resize", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "z.safetensors"))
    assert code == 1 and err.startswith("sdkit: error:") and "missing.safetensors" in err
