"""Extracting LoRAs from two checkpoints and resizing LoRAs: round trips through bake,
error against rank, kohya naming, diffusers loading, dynamic ranks, randomized SVD."""

from __future__ import annotations

import copy
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdkit.ops.lora.bake import AdapterInput, bake_loras
from sdkit.ops.lora.extract import ExtractOptions, ResizeOptions, extract_lora, resize_lora
from sdkit.ops.lora.svd import randomized_svd
from test_lora_support import single_thread  # noqa: F401  (autouse)
from test_lora_support import (diffusers_state, kohya_lora, ldm_state, ldm_to_diffusers, lora_delta, save_folder,
                               save_ldm, tiny_pipeline, write)

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
FULL = dict(rank=64, conv_rank=64, clamp_quantile=None, min_diff=0.0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory):
    """Per layout: base A as a single file, tuned B as a diffusers folder (other seed)."""
    folder = tmp_path_factory.mktemp("extract")
    out = {}
    for layout in ("sd1", "sdxl"):
        a, b = tiny_pipeline(layout, 0), tiny_pipeline(layout, 1)
        out[layout] = {"a": a, "b": b, "a_file": save_ldm(a, folder / f"{layout}-a.safetensors"),
                       "b_folder": save_folder(b, folder / f"{layout}-b"), "b_ldm": ldm_state(b)}
    return out


def bake_back(base: Path, lora: Path, out: Path) -> dict[str, torch.Tensor]:
    bake_loras(base, [AdapterInput(str(lora))], out)
    return load_file(str(out))


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_full_rank_extract_then_bake_gives_the_tuned_model(pairs, layout, tmp_path):
    pair = pairs[layout]
    lora = tmp_path / "diff.safetensors"
    report = extract_lora(pair["b_folder"], pair["a_file"], lora, ExtractOptions(**FULL))
    assert all(layer.retained > 1 - 1e-6 for layer in report.layers)
    baked = bake_back(pair["a_file"], lora, tmp_path / "baked.safetensors")
    base, tuned = load_file(str(pair["a_file"])), pair["b_ldm"]
    changed = [key for key in baked if not torch.equal(baked[key], base[key])]
    assert len(changed) > 60
    for key in changed:
        torch.testing.assert_close(baked[key], tuned[key], rtol=1e-4, atol=2e-6, msg=key)
    names = list(load_file(str(lora)))
    if layout == "sdxl":  # kohya SDXL names: LDM UNet paths, te1 / te2
        assert any(n.startswith("lora_unet_input_blocks_") for n in names)
        assert {n.split("_text_model")[0] for n in names if "_text_model" in n} == {"lora_te1", "lora_te2"}
        in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
        assert in_proj in changed  # q / k / v thirds extracted from the fused tensor
    else:  # kohya SD1 names: diffusers UNet paths, one text encoder
        assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_") for n in names)
        assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in names)


def test_extracted_lora_loads_in_diffusers(pairs, tmp_path):
    pair = pairs["sd1"]
    lora = tmp_path / "diff.safetensors"
    extract_lora(pair["b_folder"], pair["a_file"], lora, ExtractOptions(rank=8, conv_rank=4))
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    # one alpha for all modules (diffusers scales kohya modules right only then)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8.0"}
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    ours = ldm_to_diffusers(bake_back(pair["a_file"], lora, tmp_path / "b.safetensors"), pair["a"])
    pipe = copy.deepcopy(pair["a"])
    pipe.load_lora_weights(str(tmp_path), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    for key, value in diffusers_state(pipe).items():
        if key in ours:
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_error_falls_as_the_rank_rises(pairs, tmp_path):
    pair = pairs["sd1"]
    base, tuned = load_file(str(pair["a_file"])), pair["b_ldm"]
    errors = []
    for rank in (1, 4, 16):
        lora = tmp_path / f"r{rank}.safetensors"
        report = extract_lora(pair["b_folder"], pair["a_file"], lora,
                              ExtractOptions(rank=rank, clamp_quantile=None, min_diff=0.0))
        baked = bake_back(pair["a_file"], lora, tmp_path / f"b{rank}.safetensors")
        keys = [k for k in baked if not torch.equal(baked[k], base[k])]
        residual = sum(float((baked[k] - tuned[k]).pow(2).sum()) for k in keys)
        total = sum(float((tuned[k] - base[k]).pow(2).sum()) for k in keys)
        errors.append(residual / total)
        # without a clamp, the energy a layer keeps is what its residual leaves out
        kept = sum(layer.retained for layer in report.layers) / len(report.layers)
        assert 0 < kept < 1
    assert errors[0] > errors[1] > errors[2] > 0


def test_randomized_svd_reports_its_error(pairs, tmp_path):
    pair = pairs["sd1"]
    report = extract_lora(pair["b_folder"], pair["a_file"], tmp_path / "r.safetensors",
                          ExtractOptions(rank=8, randomized=True, iterations=4, clamp_quantile=None,
                                                         min_diff=0.0))
    checks = report.randomized_check
    assert len(checks) == 4
    for check in checks:
        assert check["error_full_svd"] <= check["error_randomized"] + 1e-6
        assert check["error_randomized"] < check["error_full_svd"] * 1.2 + 1e-3



@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_randomized_svd_is_torchs_seeded_svd_lowrank(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=12, niter=2)
    ours = randomized_svd(matrix, 12, 2)
    for mine, theirs in zip(ours, (u, s, v.T)):
        assert torch.equal(mine, theirs)


def test_randomized_svd_is_the_same_on_concurrent_threads():
    """Factorisations run two at a time; each must still draw its own sketch (seeding
    torch's global generator let one thread's draw move the other's; the threads are
    made to switch often so that shows)."""
    interval = sys.getswitchinterval()
    matrix = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    alone = randomized_svd(matrix, 10, 2)[1]
    mismatches = []

    def factorise_many() -> None:
        torch.set_num_threads(1)  # as the caller: LAPACK's own split is another matter
        for _ in range(300):
            if not torch.equal(randomized_svd(matrix, 10, 2)[1], alone):
                mismatches.append(1)

    threads = [threading.Thread(target=factorise_many) for _ in range(2)]
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not mismatches


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_half_precision_output_is_the_float32_one_cast(pairs, tmp_path, format):
    """Factors are held in the output dtype as they are computed; the file must hold the
    bytes of casting float32 factors at the end, up factors rescaled to the common alpha
    included (rank 48 is capped on the toy's narrower layers, so alphas differ)."""
    pair = pairs["sdxl"]
    options = dict(rank=48, clamp_quantile=None, min_diff=0.0, format=format)
    report = extract_lora(pair["b_folder"], pair["a_file"], tmp_path / "h.safetensors",
                          ExtractOptions(**options, dtype="fp16"))
    assert len({layer.rank for layer in report.layers}) > 1
    extract_lora(pair["b_folder"], pair["a_file"], tmp_path / "f.safetensors", ExtractOptions(**options, dtype="fp32"))
    half, single = load_file(str(tmp_path / "h.safetensors")), load_file(str(tmp_path / "f.safetensors"))
    assert half.keys() == single.keys()
    for key, value in single.items():
        expected = value if key.endswith(".alpha") else value.to(torch.float16)
        assert half[key].dtype == expected.dtype and torch.equal(half[key], expected), key

def test_unchanged_text_encoder_is_left_out(pairs, tmp_path):
    pair = pairs["sd1"]
    tuned = copy.deepcopy(pair["a"])
    with torch.no_grad():
        for parameter in tuned.unet.parameters():
            parameter.add_(0.05)
        next(tuned.text_encoder.parameters()).add_(0.001)  # below min_diff
    tuned_file = save_ldm(tuned, tmp_path / "t.safetensors")
    report = extract_lora(tuned_file, pair["a_file"], tmp_path / "l.safetensors", ExtractOptions(rank=2))
    assert any(note.startswith("text encoders left out") for note in report.notes)
    assert all(name.startswith("lora_unet_") for name in load_file(str(tmp_path / "l.safetensors")))


@pytest.mark.skipif(not (TOY / "sd1" / "toy-sd1.safetensors").is_file()
                    or not (TOY / "sd1-b" / "toy-sd1-b.safetensors").is_file(), reason="toy models not built")
def test_toy_models_round_trip(tmp_path):
    base, tuned = TOY / "sd1" / "toy-sd1.safetensors", TOY / "sd1-b" / "toy-sd1-b.safetensors"
    lora = tmp_path / "toy.safetensors"
    report = extract_lora(tuned, base, lora, ExtractOptions(rank=4096, conv_rank=4096, clamp_quantile=None,
                                                            min_diff=0.0, dtype="fp32"))
    baked = bake_back(base, lora, tmp_path / "baked.safetensors")
    original, target = load_file(str(base)), load_file(str(tuned))
    assert report.layers
    for key, value in baked.items():
        if not torch.equal(value, original[key]):
            torch.testing.assert_close(value.float(), target[key].float(), rtol=1e-2, atol=2e-3, msg=key)


# ---- resize ------------------------------------------------------------------------------

def lora_with_spectrum(singular: list[float], out: int = 24, inp: int = 20, alpha: float = 3.0) -> dict:
    """One kohya module whose up @ down has exactly these singular values (alpha ≠ rank)."""
    generator = torch.Generator().manual_seed(4)
    rank = len(singular)
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(inp, rank, generator=generator))
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": u * torch.tensor(singular),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": v.T.contiguous(),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(alpha)}


NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


def resized(tmp_path: Path, state: dict, **options) -> dict[str, torch.Tensor]:
    source = write(tmp_path / "in.safetensors", state)
    resize_lora(source, tmp_path / "out.safetensors", ResizeOptions(**options), overwrite=True)
    return load_file(str(tmp_path / "out.safetensors"))


def test_resize_keeps_magnitude(tmp_path):
    singular = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    state = lora_with_spectrum(singular)
    same = resized(tmp_path, state, rank=6, dtype="fp32")
    torch.testing.assert_close(lora_delta(same, NAME), lora_delta(state, NAME), rtol=1e-5, atol=1e-6)
    small = resized(tmp_path, state, rank=2, dtype="fp32")
    assert small[f"{NAME}.lora_down.weight"].shape[0] == 2
    assert float(small[f"{NAME}.alpha"]) == pytest.approx(3.0 / 6 * 2)  # alpha / rank kept
    u, s, vh = torch.linalg.svd(lora_delta(state, NAME))
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(lora_delta(small, NAME), best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,value,expected", [
    ("sv_ratio", 3.0, 2),  # σ > 8/3: 8 and 4
    ("sv_cumulative", 0.9, 4),  # Σσ of the first 3: 14/15.75 = 0.889 < 0.9 ≤ 15/15.75
    ("sv_fro", 0.99, 3),  # Σσ² of the first 2: 80/85.31 = 0.938 < 0.99² ≤ 84/85.31
])
def test_dynamic_resize(tmp_path, method, value, expected):
    singular = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    state = lora_with_spectrum(singular)
    out = resized(tmp_path, state, rank=5, dynamic=method, value=value, dtype="fp32")
    assert out[f"{NAME}.lora_down.weight"].shape[0] == expected
    energy = sum(s * s for s in singular[:expected]) / sum(s * s for s in singular)
    delta, original = lora_delta(out, NAME), lora_delta(state, NAME)
    kept = 1 - float((delta - original).pow(2).sum() / original.pow(2).sum())
    assert kept == pytest.approx(energy, abs=1e-5)


def test_resize_kohya_lora_with_conv_layers(tmp_path):
    state = kohya_lora([("lora_unet_down_blocks_0_resnets_0_conv1", (32, 32, 3, 3)),
                        ("lora_unet_down_blocks_0_attentions_0_proj_in", (32, 32, 1, 1))], rank=8, alpha=4)
    out = resized(tmp_path, state, rank=8, conv_rank=8, dtype="fp32")
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in"):
        assert out[f"{name}.lora_down.weight"].dim() == 4 and out[f"{name}.lora_up.weight"].dim() == 4
        torch.testing.assert_close(lora_delta(out, name), lora_delta(state, name), rtol=1e-4, atol=1e-6)
