"""A lone diffusion model's text encoders and VAE, found in the user's library.

The files are full-size and header-only (fixtures/families/released.py): the released key
names and shapes, so the designs are the released ones (CLIP-L is 768 wide, CLIP-G 1280,
T5-XXL and UMT5-XXL 4096 with different vocabularies, the FLUX VAE has a 16-channel latent,
Wan 2.2's 48). Which parts FLUX.1 needs is the model's own card (black-forest-labs/flux:
CLIP-L, T5-XXL, the autoencoder `ae.safetensors`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli_run import run_sdkit

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "families"
sys.path.insert(0, str(FIXTURES))

from released import (
    CLIP_G,
    CLIP_L,
    RELEASES,
    T5_XXL,
    UMT5_XXL,
    WAN22_VAE,
    clip_shapes,
    ldm_vae_shapes,
    single_file_shapes,
    t5_shapes,
    typed,
    umt5_shapes,
    wan_vae_shapes,
    write_header_only,
)

from sdkit.errors import SdkitError
from sdkit.hub.library.parts import choose_parts

FLUX = ("flux",)


@pytest.fixture(scope="session")
def released() -> dict[str, dict]:
    """File name -> the released keys, shapes and dtypes it holds."""
    t5 = t5_shapes(T5_XXL)
    return {
        "flux1-dev.safetensors": typed(single_file_shapes(RELEASES["FLUX.1-dev"]), "BF16"),
        "clip_l.safetensors": typed(clip_shapes(CLIP_L), "F16"),
        "clip_g.safetensors": typed(clip_shapes(CLIP_G, projection=True), "F16"),
        "t5xxl_fp16.safetensors": typed(t5, "F16"),
        "t5xxl_fp8_e4m3fn.safetensors": typed(t5, "F8_E4M3"),
        "umt5_xxl_fp16.safetensors": typed(umt5_shapes(UMT5_XXL), "F16"),
        "ae.safetensors": typed(ldm_vae_shapes(16, quant_convs=False), "F32"),
        "wan2.2_vae.safetensors": typed(wan_vae_shapes(WAN22_VAE), "BF16"),
    }


def comfyui(root: Path, released: dict[str, dict], files: dict[str, str]) -> Path:
    """A ComfyUI folder holding `files` (name -> folder under models/)."""
    for folder in ("checkpoints", "loras", "diffusion_models", "text_encoders", "clip", "vae"):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
    for name, folder in files.items():
        write_header_only(root / "models" / folder / name, released[name])
    return root


ALL = {"flux1-dev.safetensors": "diffusion_models", "clip_l.safetensors": "text_encoders",
       "clip_g.safetensors": "text_encoders", "umt5_xxl_fp16.safetensors": "text_encoders",
       "t5xxl_fp16.safetensors": "text_encoders", "t5xxl_fp8_e4m3fn.safetensors": "clip",
       "ae.safetensors": "vae", "wan2.2_vae.safetensors": "vae"}


def test_the_parts_of_flux_design_are_chosen(released, tmp_path):
    root = comfyui(tmp_path / "ComfyUI", released, ALL)
    models = root.resolve() / "models"
    chosen = choose_parts(models / "diffusion_models" / "flux1-dev.safetensors", None, [], root, FLUX)
    # CLIP-G, UMT5-XXL and Wan's VAE are of other designs; the fp16 T5-XXL is wider than its fp8 cast
    # (which comes first by path, in the legacy clip folder)
    assert chosen.text_encoders == [models / "text_encoders" / "clip_l.safetensors",
                                    models / "text_encoders" / "t5xxl_fp16.safetensors"]
    assert chosen.vae == models / "vae" / "ae.safetensors"
    assert chosen.lines == [
        f"CLIP-L text encoder: {models / 'text_encoders' / 'clip_l.safetensors'} (from the library)",
        (f"T5-XXL text encoder: {models / 'text_encoders' / 't5xxl_fp16.safetensors'} (from the library); "
         "2 files fit, pass --text-encoder FILE to use another"),
        f"FLUX VAE: {models / 'vae' / 'ae.safetensors'} (from the library)"]


def test_given_parts_are_kept_and_only_the_others_found(released, tmp_path):
    root = comfyui(tmp_path / "ComfyUI", released, ALL)
    models = root.resolve() / "models"
    elsewhere = write_header_only(tmp_path / "my-t5.safetensors", released["t5xxl_fp8_e4m3fn.safetensors"])
    chosen = choose_parts(models / "diffusion_models" / "flux1-dev.safetensors", None, [elsewhere], root, FLUX)
    assert chosen.text_encoders == [elsewhere, models / "text_encoders" / "clip_l.safetensors"]
    assert [line.split(":")[0] for line in chosen.lines] == ["CLIP-L text encoder", "FLUX VAE"]


def test_forge_folders_are_searched(released, tmp_path):
    root = tmp_path / "forge"
    for folder in ("Stable-diffusion", "Lora", "VAE", "text_encoder"):
        (root / "models" / folder).mkdir(parents=True)
    for name, folder in (("flux1-dev.safetensors", "Stable-diffusion"), ("clip_l.safetensors", "text_encoder"),
                         ("t5xxl_fp16.safetensors", "text_encoder"), ("ae.safetensors", "VAE")):
        write_header_only(root / "models" / folder / name, released[name])
    models = root.resolve() / "models"
    chosen = choose_parts(models / "Stable-diffusion" / "flux1-dev.safetensors", None, [], root, FLUX)
    assert chosen.vae == models / "VAE" / "ae.safetensors"
    assert [path.name for path in chosen.text_encoders] == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]


def test_other_models_and_families_are_left_as_given(released, tmp_path):
    root = comfyui(tmp_path / "ComfyUI", released, ALL)
    clip = root / "models" / "text_encoders" / "clip_l.safetensors"
    assert choose_parts(clip, None, [], root, FLUX).lines == []
    lone = root / "models" / "diffusion_models" / "flux1-dev.safetensors"
    assert choose_parts(lone, None, [], root, ()).text_encoders == []  # a family not loaded from parts


def test_a_missing_part_is_named_with_where_it_was_looked_for(released, tmp_path, capsys):
    files = {name: folder for name, folder in ALL.items() if not name.startswith("t5xxl")}
    root = comfyui(tmp_path / "ComfyUI", released, files)
    lone = root / "models" / "diffusion_models" / "flux1-dev.safetensors"
    with pytest.raises(SdkitError) as refused:
        choose_parts(lone, None, [], root, FLUX)
    assert str(refused.value) == (f"no T5-XXL text encoder (t5, width 4096) in the library {root.resolve()} "
                                  "(models/text_encoders, models/clip); pass --text-encoder FILE")
    out = tmp_path / "out.png"
    code, _, err = run_sdkit(capsys, "--library", str(root), "sample", str(lone), "-p", "x", "-o", str(out))
    assert code == 1 and err == f"sdkit: error: {refused.value}\n" and not out.exists()


def test_without_a_library_the_missing_parts_are_named(released, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SDKIT_LIBRARY", raising=False)
    lone = write_header_only(tmp_path / "flux1-dev.safetensors", released["flux1-dev.safetensors"])
    code, _, err = run_sdkit(capsys, "sample", str(lone), "-p", "x", "-o", str(tmp_path / "out.png"))
    assert code == 1 and err.count("\n") == 1
    assert f"{lone}: is a FLUX.1-dev diffusion model; it runs with CLIP-L, T5-XXL, FLUX VAE: pass them as files" in err
    assert "--library DIR" in err
