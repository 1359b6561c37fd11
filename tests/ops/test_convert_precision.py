"""Precision, pruning, EMA, CLIP repair, pickle input and metadata of `convert_model`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import test_convert_support as S
from sdkit.errors import SdkitError
from sdkit.ops import precision as convert_precision
from sdkit.ops.convert.model import ConvertOptions, convert_model

UNET = "model.diffusion_model."
VAE = "first_stage_model."
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return {key: file.get_slice(key).get_dtype() for key in file.keys()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


@pytest.fixture(scope="module")
def ldm() -> dict[str, torch.Tensor]:
    return S.ldm_state("sd1")


def with_big_values(ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(ldm)
    tensors[UNET + "out.2.weight"] = ldm[UNET + "out.2.weight"].clone()
    tensors[UNET + "out.2.weight"].view(-1)[:2] = torch.tensor([1e5, -9e4])
    tensors[VAE + "decoder.conv_out.bias"] = ldm[VAE + "decoder.conv_out.bias"].clone()
    tensors[VAE + "decoder.conv_out.bias"][0] = 7e4
    return tensors


def test_fp16_overflow_is_refused_with_the_worst_key_and_no_output(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", with_big_values(ldm))
    with pytest.raises(SdkitError) as error:
        convert_model(source, tmp_path / "out.safetensors", ConvertOptions(dtype="fp16"))
    message = str(error.value)
    assert "3 values in 2 tensors" in message and f"worst {UNET}out.2.weight" in message
    assert "100000" in message and "--clamp" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == [source]


def test_fp16_overflow_clamped_or_kept_as_inf_is_reported(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", with_big_values(ldm))
    clamped = convert_model(source, tmp_path / "clamped.safetensors", ConvertOptions(dtype="fp16", overflow="clamp"))
    out = load_file(tmp_path / "clamped.safetensors")
    assert out[UNET + "out.2.weight"].view(-1)[:2].tolist() == [65504.0, -65504.0]
    assert clamped.precision.overflow.tensors == {UNET + "out.2.weight": (2, 1e5),
                                                  VAE + "decoder.conv_out.bias": (1, 7e4)}
    assert torch.isfinite(torch.cat([t.float().view(-1) for t in out.values()])).all()
    kept = convert_model(source, tmp_path / "inf.safetensors", ConvertOptions(dtype="fp16", overflow="allow-inf"))
    out = load_file(tmp_path / "inf.safetensors")
    assert torch.isinf(out[VAE + "decoder.conv_out.bias"][0]) and kept.precision.overflow.count == 3
    assert any("kept as inf" in note for note in kept.notes)


def test_large_tensors_cast_in_pieces_give_the_same_bytes_and_report(ldm, tmp_path, monkeypatch):
    tensors = with_big_values(ldm)
    tensors[UNET + "out.2.weight"].view(-1)[-1] = 8e4  # in another piece than the first two
    source = S.write_ldm(tmp_path / "in.safetensors", tensors)
    whole = convert_model(source, tmp_path / "whole.safetensors", ConvertOptions(dtype="fp16", overflow="clamp"))
    monkeypatch.setattr(convert_precision, "PIECEWISE_BYTES", 0)
    monkeypatch.setattr(convert_precision, "PIECE_ELEMENTS", 100)  # ragged last pieces
    assert tensors[UNET + "out.2.weight"].numel() > 100
    pieces = convert_model(source, tmp_path / "pieces.safetensors", ConvertOptions(dtype="fp16", overflow="clamp"))
    expected, got = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "pieces.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert pieces.precision.overflow.tensors == whole.precision.overflow.tensors
    assert pieces.precision.overflow.tensors[UNET + "out.2.weight"] == (3, 1e5)
    with pytest.raises(SdkitError, match="4 values in 2 tensors"):
        convert_model(source, tmp_path / "refused.safetensors", ConvertOptions(dtype="fp16"))
    assert not (tmp_path / "refused.safetensors").exists()


def test_dtype_casts_floats_only_and_bf16_takes_big_values(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", with_big_values(ldm))
    result = convert_model(source, tmp_path / "out.safetensors", ConvertOptions(dtype="bf16"))
    out = load_file(tmp_path / "out.safetensors")
    assert result.precision.overflow.count == 0
    assert out[POSITION_IDS].dtype == torch.int64 and torch.equal(out[POSITION_IDS], ldm[POSITION_IDS])
    floats = {k for k, v in ldm.items() if v.is_floating_point()}
    assert {k for k, v in out.items() if v.dtype == torch.bfloat16} == floats
    expected = with_big_values(ldm)
    assert all(torch.equal(out[k], expected[k].to(torch.bfloat16)) for k in floats)


def test_keep_fp32_pattern_keeps_the_vae_also_after_a_layout_change(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", ldm)
    convert_model(source, tmp_path / "out.safetensors",
                  ConvertOptions(dtype="fp16", keep_fp32=("first_stage_model.*",)))
    kinds = dtypes(tmp_path / "out.safetensors")
    assert {kinds[k] for k in ldm if k.startswith(VAE)} == {"F32"}
    assert {kinds[k] for k in ldm if k.startswith(UNET)} == {"F16"}
    assert kinds[POSITION_IDS] == "I64"
    config = S.write_pipeline("sd1", tmp_path / "config", weights=False)
    convert_model(source, tmp_path / "folder", ConvertOptions(to="diffusers", dtype="fp16", config_dir=str(config),
                                                              keep_fp32=("re:^first_stage_model\\.",)))
    assert set(dtypes(tmp_path / "folder" / "vae" / "diffusion_pytorch_model.safetensors").values()) == {"F32"}
    assert set(dtypes(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors").values()) == {"F16"}


def ema_name(key: str) -> str:
    return "model_ema.diffusion_model" + key[len(UNET):].replace(".", "")


def training_file(ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint as training leaves it: EMA copy, schedule buffers, loss weights, strays."""
    tensors = dict(ldm)
    tensors.update({ema_name(k): v * 2 for k, v in ldm.items() if k.startswith(UNET)})
    tensors.update({"model_ema.decay": torch.tensor(0.9999),
                    "model_ema.num_updates": torch.tensor(5, dtype=torch.int32),
                    "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000),
                    "posterior_mean_coef1": torch.rand(1000),
                    VAE + "loss.discriminator.main.0.weight": torch.rand(4, 3, 3, 3), "loss.logvar": torch.zeros(()),
                    "stray.weight": torch.rand(5), "v_pred": torch.tensor([])})
    return tensors


def test_prune_keeps_exactly_the_model_weights_and_reports_why(ldm, tmp_path):
    tensors = training_file(ldm)
    source = S.write_ldm(tmp_path / "in.safetensors", tensors)
    result = convert_model(source, tmp_path / "out.safetensors", ConvertOptions(prune=True))
    S.assert_same(load_file(tmp_path / "out.safetensors"), {**ldm, "v_pred": tensors["v_pred"]})
    dropped = result.prune.dropped
    assert set(dropped["ema"]) == {k for k in tensors if k.startswith("model_ema.")}
    assert set(dropped["scheduler"]) == {"alphas_cumprod", "betas", "posterior_mean_coef1"}
    assert set(dropped["training"]) == {VAE + "loss.discriminator.main.0.weight", "loss.logvar"}
    assert dropped["not model weights"] == ["stray.weight"]
    gone = [k for keys in dropped.values() for k in keys]
    assert result.prune.bytes_saved == sum(tensors[k].numel() * tensors[k].element_size() for k in gone)


def test_ema_weights_become_the_unet(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", training_file(ldm))
    result = convert_model(source, tmp_path / "out.safetensors", ConvertOptions(ema=True, prune=True))
    out = load_file(tmp_path / "out.safetensors")
    expected = {k: v * 2 if k.startswith(UNET) else v for k, v in ldm.items()}
    S.assert_same(out, {**expected, "v_pred": torch.tensor([])})
    assert result.prune.ema_swapped == sum(k.startswith(UNET) for k in ldm)


def test_ema_that_does_not_cover_the_unet_is_refused(ldm, tmp_path):
    tensors = training_file(ldm)
    del tensors[ema_name(UNET + "out.2.weight")]
    source = S.write_ldm(tmp_path / "in.safetensors", tensors)
    with pytest.raises(SdkitError, match="do not match the UNet.*out.2.weight"):
        convert_model(source, tmp_path / "out.safetensors", ConvertOptions(ema=True))
    with pytest.raises(SdkitError, match="no EMA weights"):
        convert_model(S.write_ldm(tmp_path / "plain.safetensors", ldm), tmp_path / "o.safetensors",
                      ConvertOptions(ema=True))


def test_broken_position_ids_are_noted_and_fixed_on_request(ldm, tmp_path):
    tensors = dict(ldm)
    tensors[POSITION_IDS] = ldm[POSITION_IDS].float() + torch.linspace(0, 0.4, ldm[POSITION_IDS].numel()).view(1, -1)
    source = S.write_ldm(tmp_path / "in.safetensors", tensors)
    noted = convert_model(source, tmp_path / "kept.safetensors")
    assert POSITION_IDS in noted.broken_position_ids and any("--fix-clip" in n for n in noted.notes)
    assert load_file(tmp_path / "kept.safetensors")[POSITION_IDS].dtype == torch.float32
    fixed = convert_model(source, tmp_path / "fixed.safetensors", ConvertOptions(fix_clip=True, dtype="fp16"))
    out = load_file(tmp_path / "fixed.safetensors")[POSITION_IDS]
    assert POSITION_IDS in fixed.fixed_position_ids
    assert out.dtype == torch.int64 and torch.equal(out, torch.arange(out.numel()).view(out.shape))


def test_pickle_with_shared_storage_comes_out_as_separate_correct_copies(tmp_path):
    base = torch.arange(48, dtype=torch.float32)
    weight = base[:24].view(4, 6)
    tensors = {"weight": weight, "tied": weight, "window": base[30:42].view(3, 4), "transposed": weight.t(),
               "ids": torch.arange(5)}
    source = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 42}, source)
    result = convert_model(source, tmp_path / "model.safetensors")
    out = load_file(tmp_path / "model.safetensors")
    S.assert_same(out, {k: v.contiguous() for k, v in tensors.items()})
    assert ["tied", "weight"] in result.shared
    meta = metadata(tmp_path / "model.safetensors")
    assert meta["global_step"] == "42"
    assert json.loads(meta["sdkit.recipe"])["inputs"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_metadata_is_carried_without_stale_hashes(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", ldm, {
        "modelspec.title": "My model", "modelspec.author": "someone", "modelspec.hash_sha256": "0x00",
        "sshs_model_hash": "abc", "ss_note": "kept"})
    convert_model(source, tmp_path / "out.safetensors", ConvertOptions(dtype="fp16"))
    meta = metadata(tmp_path / "out.safetensors")
    assert meta["modelspec.title"] == "My model" and meta["modelspec.author"] == "someone"
    assert meta["ss_note"] == "kept" and "sshs_model_hash" not in meta
    raw = (tmp_path / "out.safetensors").read_bytes()  # the output's own data hash, not the input's
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.implementation"] == "https://github.com/CompVis/stable-diffusion"
    assert json.loads(meta["sdkit.recipe"])["parameters"]["dtype"] == "fp16"


def test_existing_output_or_the_input_as_output_needs_force(ldm, tmp_path):
    source = S.write_ldm(tmp_path / "in.safetensors", ldm)
    (tmp_path / "out.safetensors").write_bytes(b"x")
    with pytest.raises(SdkitError, match="already exists"):
        convert_model(source, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"x"
    convert_model(source, tmp_path / "out.safetensors", ConvertOptions(force=True))
    before = source.read_bytes()
    with pytest.raises(SdkitError, match=r"is one of the inputs \(use --force to replace it\)"):
        convert_model(source, source)
    assert source.read_bytes() == before


@pytest.mark.parametrize("source, target", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                            (torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_fast_cast_gives_torchs_bytes(source: torch.dtype, target: torch.dtype) -> None:
    from sdkit.ops.precision import cast_tensor

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 300_001, generator=generator) * 1e4  # beyond one slice, not a multiple
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 6e-8, 1e-40, 65504.0, 3e38])
    values[0, : special.numel()] = special
    tensor = values.to(source)
    expected = tensor.to(target)
    produced = cast_tensor(tensor, target)
    assert produced.dtype == target and produced.shape == expected.shape
    assert torch.equal(produced.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
