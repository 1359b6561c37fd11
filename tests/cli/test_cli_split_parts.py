"""A split part given where a whole model is needed (and the reverse) is refused in one
line that names what the file is and what was expected (header-only full-size files)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from cli_run import run_sdkit  # noqa: E402
from released import RELEASES, ldm_vae_shapes, single_file_shapes, typed, write_header_only  # noqa: E402

FLUX_PART = "a FLUX.1-dev diffusion model"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("parts")
    flux = write_header_only(folder / "flux1-dev.safetensors",
                             typed(single_file_shapes(RELEASES["FLUX.1-dev"]), "F8_E4M3"))
    vae = write_header_only(folder / "ae.safetensors", typed(ldm_vae_shapes(16, quant_convs=False), "BF16"))
    all_in_one = write_header_only(folder / "flux1-dev-aio.safetensors", {
        **typed(single_file_shapes(RELEASES["FLUX.1-dev"]), "F8_E4M3", "model.diffusion_model."),
        **typed(ldm_vae_shapes(16, quant_convs=False), "BF16", "vae.")})
    return {"flux": flux, "vae": vae, "flux_all_in_one": all_in_one, "out": folder}


@pytest.mark.parametrize("argv, expected", [
    (["sample", "{flux}", "-p", "a cat", "-o", "{out}/cat.png"], f"is {FLUX_PART}; it runs with CLIP-L, T5-XXL, FLUX VAE: pass them as files"),
    (["lora", "check", "{flux}", "{flux}"], f"is {FLUX_PART}, not a LoRA / LyCORIS adapter"),
    (["lora", "bake", "{flux}", "{flux}", "-o", "{out}/merged.safetensors"],
     f"is {FLUX_PART}, not a LoRA / LyCORIS adapter"),
    (["lora", "check", "{vae}", "{flux}"], "is a 16-channel VAE (SD3 VAE / FLUX VAE design: the weights alone "
                                           "do not tell which), not a model adapters can be applied to"),
    (["merge", "{flux}", "{vae}", "-o", "{out}/merged.safetensors"],
     "is a 16-channel VAE (SD3 VAE / FLUX VAE design: the weights alone do not tell which), but A "),
    (["vae", "check", "{vae}", "{vae}"], "not a base model with a diffusion model (identified as vae)"),
    (["convert", "{flux_all_in_one}", "--to", "diffusers", "-o", "{out}/flux-diffusers"],
     "has no text_encoder; a FLUX.1 pipeline needs CLIP-L, T5-XXL and the FLUX VAE"),
])
def test_split_parts_are_refused_in_one_line(argv, expected, parts, capsys):
    args = [arg.format(**{k: str(v) for k, v in parts.items()}) for arg in argv]
    code, _out, err = run_sdkit(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("sdkit: error: "), err
    assert expected in lines[0]
    assert not (parts["out"] / "merged.safetensors").exists() and not (parts["out"] / "flux-diffusers").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--te-alpha", "0.2"], "a component weight for te, but no input has te keys"),
    (["--blocks", "BASE:0.3"], "this model has no block 'BASE' (its blocks: IN, D00, S00, OUT)"),
    (["--take", "te=B"], "--take for te, but no input has te keys"),
])
def test_merge_settings_a_transformer_cannot_take_are_refused(extra, expected, capsys, tmp_path):
    """A lone transformer diffusion model holds one component, its diffusion model (unet),
    in its own blocks: a setting for another component or a UNet block would silently do
    nothing."""
    from safetensors.torch import save_file

    from released import tiny_tensors

    for name, seed in (("a", 0), ("b", 1)):
        save_file(tiny_tensors("flux", "ldm", seed=seed), tmp_path / f"{name}.safetensors")
    output = tmp_path / "merged.safetensors"
    code, _out, err = run_sdkit(capsys, "merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                *extra, "-o", str(output))
    assert code == 1 and expected in err and err.count("\n") == 1
    assert not output.exists()
    assert run_sdkit(capsys, "merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                     "--alpha", "0.3", "-o", str(output))[0] == 0
