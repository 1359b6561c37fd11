"""`vae check` across the transformer families, from headers: every cross-family pair is
incompatible at once, each family's own VAE design matches (full-size header-only files,
fixtures/families/released.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))

from released import (RELEASES, WAN21_VAE, WAN22_VAE, diffusers_vae_shapes, flux2_vae_shapes,  # noqa: E402
                      ldm_vae_shapes,
                      single_file_shapes, typed, wan_vae_shapes, write_header_only)

from sdkit.runtime.vae_check import check_vae  # noqa: E402

BASES = {"flux": "FLUX.1-dev", "sd3": "Stable Diffusion 3.5 Large", "z-image": "Z-Image-Turbo",
         "qwen-image": "Qwen-Image", "lumina2": "Lumina-Image-2.0", "hidream": "HiDream-I1",
         "wan21": "Wan2.1-T2V-14B", "wan22-5b": "Wan2.2-TI2V-5B", "chroma": "Chroma1-HD",
         "flux2": "FLUX.2-dev", "chroma-radiance": "Chroma1-Radiance"}
VAES = {"sd-sdxl": lambda: ldm_vae_shapes(4, quant_convs=True),  # SD1 / SD2 / SDXL design
        "flux-sd3": lambda: ldm_vae_shapes(16, quant_convs=False),  # FLUX.1 / SD3 design
        "wan21": lambda: wan_vae_shapes(WAN21_VAE), "wan22": lambda: wan_vae_shapes(WAN22_VAE),
        "flux2": flux2_vae_shapes}
# the VAE design each base runs with; every other pair is incompatible
RIGHT = {"flux": "flux-sd3", "sd3": "flux-sd3", "z-image": "flux-sd3", "qwen-image": "wan21",
         "lumina2": "flux-sd3", "hidream": "flux-sd3", "wan21": "wan21", "wan22-5b": "wan22",
         "chroma": "flux-sd3", "flux2": "flux2", "chroma-radiance": None}  # Radiance draws pixels


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    made = {}
    for name, release in BASES.items():
        model = RELEASES[release]
        made[name] = write_header_only(folder / f"{name}.safetensors", typed(single_file_shapes(model), "BF16"),
                                       model.metadata)
    for name, shapes in VAES.items():
        made["vae-" + name] = write_header_only(folder / f"vae-{name}.safetensors", typed(shapes(), "BF16"))
    return made


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("vae", list(VAES))
def test_every_cross_family_pair_is_incompatible_and_the_right_one_matches(base, vae, files):
    report = check_vae(files[base], files["vae-" + vae])
    if RIGHT[base] == vae:
        assert report.verdict == "match", report.reasons
        assert report.architecture["fits"] and not report.architecture["problems"]
    else:
        assert report.verdict == "incompatible", report.reasons
        assert report.reasons and report.reasons == report.architecture["problems"]
    assert report.fp16["status"] == "not tested" and report.denoising is None


def test_the_shared_flux_sd3_design_is_said_to_pass_both(files):
    report = check_vae(files["flux"], files["vae-flux-sd3"])
    assert any("Stable Diffusion 3 uses a VAE of the same design in another latent space" in reason
               for reason in report.reasons)


def vae_folder(folder: Path, scaling: float, shift: float) -> Path:
    folder.mkdir()
    write_header_only(folder / "diffusion_pytorch_model.safetensors", typed(diffusers_vae_shapes(16, False), "BF16"))
    config = {"_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": scaling,
              "shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False,
              "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_vae_whose_config_names_its_family_is_incompatible_with_the_other(files, tmp_path):
    sd3_vae = vae_folder(tmp_path / "sd3-vae", 1.5305, 0.0609)
    flux_vae = vae_folder(tmp_path / "flux-vae", 0.3611, 0.1159)
    assert check_vae(files["sd3"], sd3_vae).verdict == "match"
    refused = check_vae(files["flux"], sd3_vae)
    assert refused.verdict == "incompatible"
    assert refused.reasons[0] == ("its config states scaling 1.5305 and shift 0.0609 (Stable Diffusion 3); "
                                  "FLUX.1 latents are scaled 0.3611, shifted 0.1159")
    assert check_vae(files["flux"], flux_vae).verdict == "match"
    assert check_vae(files["z-image"], flux_vae).verdict == "match"  # Z-Image runs on the FLUX.1 VAE
    assert check_vae(files["sd3"], flux_vae).verdict == "incompatible"
