"""identify() on the released transformer families at full size, from headers alone.

Every file here is header-only (fixtures/families/released.py): the diffusers convention
comes from the diffusers classes on the meta device, the single-file convention from the
original implementations' layout, checked against diffusers' own converters in
tests/fixtures/test_family_headers.py. Each is written in every precision people keep.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "families"
sys.path.insert(0, str(FIXTURES))

from released import (CLIP_G, CLIP_L, RELEASES, T5_XXL, clip_shapes, diffusers_flux2_vae_shapes,  # noqa: E402
                      diffusers_shapes, flux2_vae_shapes, ldm_vae_shapes, single_file_shapes, t5_shapes,
                      typed, write_header_only)

from sdkit.arch import FAMILIES, identify  # noqa: E402
from sdkit.errors import SdkitError  # noqa: E402
from sdkit.io import open_model  # noqa: E402

UNET = "model.diffusion_model."
NEEDS = {"flux": ["CLIP-L", "T5-XXL", "FLUX VAE"], "sd3": ["CLIP-L", "CLIP-G", "T5-XXL", "SD3 VAE"],
         "z-image": ["Qwen3-4B", "FLUX VAE"], "qwen-image": ["Qwen2.5-VL-7B", "Qwen-Image VAE"],
         "lumina2": ["Gemma-2-2B", "FLUX VAE"],
         "hidream": ["CLIP-L", "CLIP-G", "T5-XXL", "Llama-3.1-8B", "FLUX VAE"],
         "wan": ["UMT5-XXL", "Wan 2.1 VAE"], "chroma": ["T5-XXL", "FLUX VAE"],
         "chroma-radiance": ["T5-XXL"], "anima": ["Qwen3-0.6B", "Qwen-Image VAE"]}
# releases that run with other parts than their family's usual ones
RELEASE_NEEDS = {"Wan2.1-I2V-14B-480P": ["UMT5-XXL", "CLIP-H vision", "Wan 2.1 VAE"],
                 "Wan2.1-I2V-14B-720P": ["UMT5-XXL", "CLIP-H vision", "Wan 2.1 VAE"],
                 "Wan2.2-TI2V-5B": ["UMT5-XXL", "Wan 2.2 VAE"],
                 "FLUX.2-dev": ["Mistral-Small-3.1-24B", "FLUX.2 VAE"],
                 "FLUX.2-klein-4B": ["Qwen3-4B", "FLUX.2 VAE"], "FLUX.2-klein-9B": ["Qwen3-8B", "FLUX.2 VAE"]}
VARIANTS = {"FLUX.1-Fill-dev": "inpaint", "FLUX.1-Depth-dev": "depth", "Wan2.1-I2V-14B-480P": "i2v",
            "Wan2.1-I2V-14B-720P": "i2v", "Wan2.2-I2V-A14B": "i2v"}
DIT_FAMILIES = ("z-image", "qwen-image", "lumina2", "hidream", "anima")
CONVENTIONS = [("ldm", ""), ("ldm", UNET), ("diffusers", "")]
PRECISIONS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8 e4m3fn", "F8_E5M2": "fp8 e5m2"}


def needs_of(release: str) -> list[str]:
    return RELEASE_NEEDS.get(release) or NEEDS.get(RELEASES[release].family) or NEEDS[release]


def identify_file(path: Path):
    with open_model(path) as model:
        return identify(model)


@pytest.fixture(scope="session")
def shapes_of():
    """(release, convention) -> the released denoiser's keys and shapes, built once."""
    cache: dict[tuple[str, str], dict] = {}

    def get(release: str, convention: str) -> dict:
        if (release, convention) not in cache:
            model = RELEASES[release]
            build = diffusers_shapes if convention == "diffusers" else single_file_shapes
            cache[release, convention] = build(model)
        return cache[release, convention]
    return get


@pytest.mark.parametrize("release, convention, prefix", [
    (release, convention, prefix) for release, model in RELEASES.items() for convention, prefix in CONVENTIONS
    if convention == "ldm" or model.diffusers_class is not None])
def test_each_release_in_each_convention(release, convention, prefix, shapes_of, tmp_path):
    model = RELEASES[release]
    path = write_header_only(tmp_path / "model.safetensors",
                             typed(shapes_of(release, convention), model.dtype, prefix), model.metadata)
    identity = identify_file(path)
    named = model.single_file_convention if convention == "ldm" else convention
    assert (identity.kind, identity.family, identity.key_convention) == ("unet", model.family, named)
    assert identity.facts["release"] == release and not identity.nonstandard
    assert identity.components == ["transformer"]
    assert identity.part == f"{release} diffusion model"
    assert identity.needs == needs_of(release)
    assert identity.summary == (f"{release} diffusion model, {PRECISIONS[model.dtype]}; "
                                f"needs: {', '.join(needs_of(release))}")
    assert identity.variant == VARIANTS.get(release, "normal")
    assert identity.prediction == "unknown"  # flow matching: neither epsilon nor v


@pytest.mark.parametrize("release, convention", [
    (name, convention) for name, m in RELEASES.items() if m.family in DIT_FAMILIES
    for convention in ("ldm", "diffusers") if convention == "ldm" or m.diffusers_class is not None])
def test_dit_family_releases_in_fp8(release, convention, shapes_of, tmp_path):
    model = RELEASES[release]
    path = write_header_only(tmp_path / "model.safetensors",
                             typed(shapes_of(release, convention), "F8_E4M3", UNET), model.metadata)
    identity = identify_file(path)
    assert (identity.family, identity.facts["release"], identity.variant) == (model.family, release, "normal")
    assert identity.summary == f"{release} diffusion model, fp8 e4m3fn; needs: {', '.join(NEEDS[model.family])}"


@pytest.mark.parametrize("release", [name for name, m in RELEASES.items() if m.family in DIT_FAMILIES])
def test_dit_family_releases_in_scaled_fp8(release, shapes_of, tmp_path):
    model = RELEASES[release]
    path = write_header_only(tmp_path / "model.safetensors", scaled_fp8(shapes_of(release, "ldm")), model.metadata)
    identity = identify_file(path)
    assert identity.facts["release"] == release
    assert identity.summary.startswith(f"{release} diffusion model, fp8 e4m3fn scaled; needs: ")


def test_look_alikes_of_the_dit_families_are_said(shapes_of, tmp_path):
    """A file without naming metadata is its family's shared design, with the releases
    that have the same keys and shapes listed, never one of them guessed."""
    wanted = {"Z-Image": {"Z-Image-Turbo", "Z-Image-Base"},
              "Qwen-Image": {"Qwen-Image-Edit", "Qwen-Image-Edit-2509", "Qwen-Image-Edit-2511", "Qwen-Image-2512"},
              "Lumina-Image-2.0": {"Neta Lumina", "NetaYume Lumina"},
              "HiDream-I1": {"HiDream-I1-Full", "HiDream-I1-Dev", "HiDream-I1-Fast"}}
    for release, look_alikes in wanted.items():
        path = write_header_only(tmp_path / "model.safetensors", typed(shapes_of(release, "ldm"), "BF16"))
        identity = identify_file(path)
        assert identity.facts["release"] == release
        assert set(identity.facts["release_look_alikes"]) == look_alikes


@pytest.mark.parametrize("release, convention", [
    (name, convention) for name, model in RELEASES.items() for convention in ("ldm", "diffusers")
    if convention == "ldm" or model.diffusers_class is not None])
def test_no_family_claims_another_familys_release(release, convention, shapes_of, tmp_path):
    from sdkit.arch.fingerprint import match_transformers
    from sdkit.arch.keyview import KeyView

    path = write_header_only(tmp_path / "model.safetensors", typed(shapes_of(release, convention), "BF16"))
    with open_model(path) as model:
        matched = [match.family.name for match in match_transformers(KeyView(model))]
    assert matched == [RELEASES[release].family]


@pytest.mark.parametrize("dtype", list(PRECISIONS))
def test_every_plain_precision_is_named(dtype, shapes_of, tmp_path):
    path = write_header_only(tmp_path / "flux.safetensors", typed(shapes_of("FLUX.1-dev", "ldm"), dtype))
    identity = identify_file(path)
    assert identity.facts["release"] == "FLUX.1-dev"
    assert identity.precision.label == PRECISIONS[dtype]


def scaled_fp8(shapes: dict, fp8: str = "F8_E4M3", prefix: str = UNET) -> dict:
    """ComfyUI's scaled fp8 layout: 2-D weights in fp8 with a one-value `scale_weight` each,
    the rest in bf16, a `scaled_fp8` marker whose dtype names the format."""
    tensors = {}
    for name, shape in shapes.items():
        quantized = name.endswith(".weight") and len(shape) == 2
        tensors[prefix + name] = (fp8 if quantized else "BF16", shape)
        if quantized:
            tensors[prefix + name[: -len("weight")] + "scale_weight"] = ("F32", ())
    tensors[prefix + "scaled_fp8"] = (fp8, (0,))
    return tensors


@pytest.mark.parametrize("fp8, words", [("F8_E4M3", "fp8 e4m3fn"), ("F8_E5M2", "fp8 e5m2")])
def test_scaled_fp8_is_named_with_its_format(fp8, words, shapes_of, tmp_path):
    path = write_header_only(tmp_path / "flux.safetensors", scaled_fp8(shapes_of("FLUX.1-dev", "ldm"), fp8))
    identity = identify_file(path)
    assert identity.summary == f"FLUX.1-dev diffusion model, {words} scaled; needs: CLIP-L, T5-XXL, FLUX VAE"
    quantization = identity.precision.quantization
    assert quantization["scheme"] == "scaled-fp8"
    assert quantization["scaled_layers"] == sum(1 for n, s in shapes_of("FLUX.1-dev", "ldm").items()
                                                if n.endswith(".weight") and len(s) == 2)


def test_scaled_fp8_without_scales_is_refused(shapes_of, tmp_path):
    tensors = {n: v for n, v in scaled_fp8(shapes_of("FLUX.1-dev", "ldm")).items()
               if not n.endswith(".scale_weight")}
    path = write_header_only(tmp_path / "flux.safetensors", tensors)
    with pytest.raises(SdkitError, match=r"scaled_fp8 marks scaled fp8 weights but the file holds no"):
        identify_file(path)


def test_scaled_fp8_with_misshapen_scale_is_refused(shapes_of, tmp_path):
    tensors = scaled_fp8(shapes_of("FLUX.1-dev", "ldm"))
    tensors[UNET + "img_in.scale_weight"] = ("F32", (3072,))
    path = write_header_only(tmp_path / "flux.safetensors", tensors)
    with pytest.raises(SdkitError, match=r"img_in.scale_weight has shape \[3072\]; expected one value"):
        identify_file(path)


def test_comfy_mixed_quantization_metadata(shapes_of, tmp_path):
    shapes = shapes_of("FLUX.1-dev", "ldm")
    layers = [n[: -len(".weight")] for n, s in shapes.items()
              if n.startswith("double_blocks.") and n.endswith(".weight") and len(s) == 2]
    tensors = typed(shapes, "BF16")
    for layer in layers:
        tensors[layer + ".weight"] = ("F8_E4M3", shapes[layer + ".weight"])
        tensors[layer + ".weight_scale"] = ("F32", ())
    metadata = {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in layers}})}
    identity = identify_file(write_header_only(tmp_path / "flux.safetensors", tensors, metadata))
    assert identity.facts["release"] == "FLUX.1-dev"
    assert identity.precision.label == f"mixed: {len(layers)} fp8 e4m3fn layers, rest bf16"
    del tensors[layers[3] + ".weight_scale"]
    with pytest.raises(SdkitError, match=layers[3] + r".weight_scale is missing"):
        identify_file(write_header_only(tmp_path / "broken.safetensors", tensors, metadata))


def test_mixed_layers_listed_without_the_checkpoint_prefix_are_counted_once(tmp_path):
    """A checkpoint's keys carry `model.diffusion_model.`; its metadata may list the layers
    without it while each layer's `comfy_quant` marker names it with it: one layer each."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux" / "toy-flux.safetensors")
    layers = [n[: -len(".weight")] for n, t in tensors.items() if n.startswith("single_blocks.") and t.dim() == 2]
    marker = torch.tensor(list(b'{"format":"float8_e4m3fn"}'), dtype=torch.uint8)
    for layer in layers:
        tensors[layer + ".weight"] = tensors[layer + ".weight"].to(torch.float8_e4m3fn)
        tensors[layer + ".weight_scale"] = torch.tensor(1.0)
        tensors[layer + ".comfy_quant"] = marker.clone()
    metadata = {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in layers}})}
    save_file({UNET + n: t for n, t in tensors.items()}, tmp_path / "flux.safetensors", metadata)
    identity = identify_file(tmp_path / "flux.safetensors")
    assert identity.precision.label == f"mixed: {len(layers)} fp8 e4m3fn layers, rest fp16"


def test_look_alike_releases_are_named_only_by_metadata(shapes_of, tmp_path):
    tensors = typed(shapes_of("FLUX.1-dev", "ldm"), "BF16")
    plain = identify_file(write_header_only(tmp_path / "dev.safetensors", tensors))
    assert set(plain.facts["release_look_alikes"]) == {"FLUX.1-Kontext-dev", "FLUX.1-Krea-dev"}
    kontext = identify_file(write_header_only(tmp_path / "kontext.safetensors", tensors,
                                              {"modelspec.architecture": "flux-1-kontext-dev"}))
    assert kontext.facts["release"] == "FLUX.1-Kontext-dev"


def test_a_file_mixing_two_denoisers_is_refused(shapes_of, ldm_checkpoint, tmp_path):
    tensors = typed(shapes_of("FLUX.1-dev", "ldm"), "BF16", UNET)
    tensors.update({name: ("F16", tuple(t.shape)) for name, t in ldm_checkpoint("sdxl").items()
                    if name.startswith(UNET)})
    path = write_header_only(tmp_path / "mixed.safetensors", tensors)
    with pytest.raises(SdkitError, match=r"mixes model families: a FLUX\.1 transformer "
                                         r"\(model\.diffusion_model\.double_blocks\.\*\) and "
                                         r"a Stable Diffusion XL base UNet \(model\.diffusion_model\.input_blocks\.\*\)"):
        identify_file(path)


def test_comfyui_all_in_one_flux_checkpoint(shapes_of, tmp_path):
    tensors = typed(shapes_of("FLUX.1-schnell", "ldm"), "BF16", UNET)
    tensors.update(typed(clip_shapes(CLIP_L), "BF16", "text_encoders.clip_l.transformer."))
    tensors.update(typed(t5_only(), "BF16", "text_encoders.t5xxl.transformer."))
    tensors.update(typed(ldm_vae_shapes(16, quant_convs=False), "BF16", "vae."))
    identity = identify_file(write_header_only(tmp_path / "aio.safetensors", tensors))
    assert (identity.kind, identity.family, identity.facts["release"]) == ("checkpoint", "flux", "FLUX.1-schnell")
    assert identity.components == ["transformer", "vae", "text_encoder", "text_encoder_2"]
    assert identity.needs == [] and identity.part == "FLUX.1-schnell checkpoint"


def t5_only() -> dict:
    """T5-XXL as ComfyUI's t5xxl files hold it: the tied token table once, as `shared`."""
    return {n: s for n, s in t5_shapes(T5_XXL).items() if n != "encoder.embed_tokens.weight"}


@pytest.mark.parametrize("name, shapes, part", [
    ("clip_l", lambda: clip_shapes(CLIP_L), "CLIP-L text encoder"),
    ("clip_g", lambda: clip_shapes(CLIP_G, projection=True), "CLIP-G text encoder"),
    ("t5xxl", t5_only, "T5-XXL encoder"),
])
def test_text_encoders_alone(name, shapes, part, tmp_path):
    identity = identify_file(write_header_only(tmp_path / f"{name}.safetensors", typed(shapes(), "F16")))
    assert (identity.kind, identity.part) == ("text-encoder", part)


def test_flux_vae_alone_is_a_16_channel_vae_not_an_sdxl_one(tmp_path):
    identity = identify_file(write_header_only(tmp_path / "ae.safetensors",
                                               typed(ldm_vae_shapes(16, quant_convs=False), "F32")))
    assert identity.kind == "vae"
    assert identity.facts["compatible_families"][:2] == ["sd3", "flux"]
    assert {"z-image", "lumina2", "hidream", "chroma"} <= set(identity.facts["compatible_families"])
    assert "qwen-image" not in identity.facts["compatible_families"]  # its VAE is a 3-D one
    assert "16-channel VAE" in identity.part
    sdxl = identify_file(write_header_only(tmp_path / "sdxl_vae.safetensors",
                                           typed(ldm_vae_shapes(4, quant_convs=True), "F32")))
    assert "flux" not in sdxl.facts["compatible_families"]


def test_cli_inspect_is_header_only_and_imports_no_torch(shapes_of, tmp_path):
    path = write_header_only(tmp_path / "flux.safetensors", scaled_fp8(shapes_of("FLUX.1-dev", "ldm")))
    code = ("import sys, json; from sdkit.cli.main import main\n"
            "try:\n    main(['inspect', '--json', sys.argv[1]])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("NO-TORCH")
    report = json.loads(done.stdout)
    assert (report["family"], report["release"]) == ("flux", "FLUX.1-dev")
    assert report["summary"] == "FLUX.1-dev diffusion model, fp8 e4m3fn scaled; needs: CLIP-L, T5-XXL, FLUX VAE"
    assert report["needs"] == NEEDS["flux"]


@pytest.mark.parametrize("family, design", [
    ("flux", "FLUX.1-schnell"), ("sd3", "Stable Diffusion 3 Medium"), ("z-image", "Z-Image"),
    ("qwen-image", "Qwen-Image"), ("lumina2", "Lumina-Image-2.0"), ("hidream", "HiDream-I1"),
    ("wan", "Wan2.1-T2V-1.3B"), ("chroma", "Chroma1-HD"), ("flux2", "FLUX.2-dev"),
])
@pytest.mark.parametrize("convention", ["ldm", "diffusers"])
def test_tiny_models_of_the_peers_tests_are_the_family_never_a_release(family, design, convention, tmp_path):
    from safetensors.torch import save_file

    from released import tiny_tensors

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_tensors(family, convention), path)
    identity = identify_file(path)
    conventions = {layout.convention for layout in FAMILIES[family].layouts}
    named = convention if convention in conventions else conventions.pop()  # one naming only
    assert (identity.kind, identity.family, identity.key_convention) == ("unet", family, named)
    assert "release" not in identity.facts and identity.facts["design"] == design
    assert identity.part.endswith(f"diffusion model ({design} design, non-standard dimensions)")


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K", "Q5_1"])
def test_comfyui_gguf_files_are_identified_with_their_quantization(quant, shapes_of, tmp_path):
    from released import write_gguf_header_only

    path = write_gguf_header_only(tmp_path / "flux.gguf", shapes_of("FLUX.1-dev", "ldm"), quant, "flux")
    identity = identify_file(path)
    assert identity.facts["release"] == "FLUX.1-dev"
    assert identity.summary == f"FLUX.1-dev diffusion model, GGUF {quant}; needs: CLIP-L, T5-XXL, FLUX VAE"
    quantization = identity.precision.quantization
    assert quantization["scheme"] == "gguf" and list(quantization["formats"])[0] == quant
    assert not any("general.architecture" in note for note in identity.notes)


def test_gguf_architecture_that_contradicts_the_weights_is_noted(shapes_of, tmp_path):
    from released import write_gguf_header_only

    path = write_gguf_header_only(tmp_path / "sd3.gguf", shapes_of("Stable Diffusion 3.5 Large", "ldm"), "Q8_0", "flux")
    identity = identify_file(path)
    assert identity.facts["release"] == "Stable Diffusion 3.5 Large"
    assert "general.architecture says 'flux' but the weights are Stable Diffusion 3 (ComfyUI-GGUF expects 'sd3')" \
        in identity.notes


def test_truncated_gguf_is_refused_in_one_line(shapes_of, tmp_path):
    from released import write_gguf_header_only

    path = write_gguf_header_only(tmp_path / "flux.gguf", shapes_of("FLUX.1-dev", "ldm"), "Q8_0", "flux")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 4096)
    with pytest.raises(SdkitError) as refused:
        identify_file(path)
    assert "\n" not in str(refused.value)
# ---- FLUX.2 and Chroma: never FLUX.1 ---------------------------------------------------------

FLUX1_RELATIVES = [name for name, model in RELEASES.items()
                   if model.family in ("chroma", "chroma-radiance", "flux2")]


@pytest.mark.parametrize("release", FLUX1_RELATIVES)
def test_flux1_relatives_are_never_flux1(release, shapes_of, tmp_path):
    """FLUX.1's layout asks for `vector_in` and the per-block `img_mod`: FLUX.2 and Chroma
    files lack both and share FLUX.1's `double_blocks.` / `single_blocks.` names."""
    shapes = shapes_of(release, "ldm")
    assert any(name.startswith("double_blocks.") for name in shapes)
    assert not any(name.startswith("vector_in.") or "_mod." in name for name in shapes)
    identity = identify_file(write_header_only(tmp_path / "model.safetensors", typed(shapes, "BF16", UNET)))
    assert identity.family == RELEASES[release].family != "flux"
    assert "FLUX.1" not in identity.summary and not identity.refusal


@pytest.mark.parametrize("release, marker", [("Chroma1-HD", "distilled_guidance_layer."),
                                             ("FLUX.2-klein-4B", "double_stream_modulation_"),
                                             ("FLUX.2-klein-4B", "single_stream_modulation.")])
def test_a_relative_without_its_own_layers_is_an_unknown_transformer_not_flux1(release, marker, shapes_of,
                                                                              tmp_path):
    shapes = {n: s for n, s in shapes_of(release, "ldm").items() if not n.startswith(marker)}
    identity = identify_file(write_header_only(tmp_path / "model.safetensors", typed(shapes, "BF16")))
    assert (identity.kind, identity.family) == ("unknown", "unknown")
    assert identity.part.startswith("unknown transformer: ")
    assert "FLUX.1 diffusion model" not in identity.summary


def test_klein_base_and_chroma_siblings_are_named_only_by_metadata(shapes_of, tmp_path):
    klein = typed(shapes_of("FLUX.2-klein-9B", "ldm"), "BF16")
    plain = identify_file(write_header_only(tmp_path / "klein.safetensors", klein))
    assert plain.facts["release"] == "FLUX.2-klein-9B"
    assert plain.facts["release_look_alikes"] == ["FLUX.2-klein-base-9B"]
    assert "FLUX.2-klein-base-9B has the same keys and shapes" in " ".join(plain.notes)
    base = identify_file(write_header_only(tmp_path / "base.safetensors", klein,
                                           {"modelspec.architecture": "Flux.2-klein-base-9b"}))
    assert base.facts["release"] == "FLUX.2-klein-base-9B" and base.needs == ["Qwen3-8B", "FLUX.2 VAE"]
    chroma = typed(shapes_of("Chroma1-HD", "ldm"), "BF16")
    flash = identify_file(write_header_only(tmp_path / "flash.safetensors", chroma,
                                            {"modelspec.architecture": "chroma-flash"}))
    assert (flash.family, flash.facts["release"]) == ("chroma", "Chroma1-Flash")


def test_a_pruned_klein_9b_is_measured_against_klein_9b(shapes_of, tmp_path):
    shapes = {n: s for n, s in shapes_of("FLUX.2-klein-9B", "ldm").items()
              if not any(n.startswith(f"single_blocks.{i}.") for i in range(20, 24))}
    identity = identify_file(write_header_only(tmp_path / "pruned.safetensors", typed(shapes, "BF16")))
    assert (identity.family, identity.facts["design"], identity.nonstandard) == ("flux2", "FLUX.2-klein-9B", True)
    assert "release" not in identity.facts
    assert any("single blocks 20 (FLUX.2-klein-9B has 24)" in note for note in identity.notes)
    assert identity.needs == ["Qwen3-8B", "FLUX.2 VAE"]


def test_scaled_fp8_chroma(shapes_of, tmp_path):
    identity = identify_file(write_header_only(tmp_path / "chroma.safetensors",
                                               scaled_fp8(shapes_of("Chroma1-HD", "ldm"))))
    assert identity.summary == "Chroma1-HD diffusion model, fp8 e4m3fn scaled; needs: T5-XXL, FLUX VAE"


def test_a_file_mixing_flux2_and_flux1_is_refused(shapes_of, tmp_path):
    tensors = typed(shapes_of("FLUX.1-dev", "ldm"), "BF16", UNET)
    tensors.update(typed(shapes_of("FLUX.2-klein-4B", "diffusers"), "BF16"))
    with pytest.raises(SdkitError, match=r"mixes model families: .*FLUX\.1 transformer.*FLUX\.2 transformer"):
        identify_file(write_header_only(tmp_path / "mixed.safetensors", tensors))


def test_comfyui_all_in_one_chroma_checkpoint(shapes_of, tmp_path):
    tensors = typed(shapes_of("Chroma1-HD", "ldm"), "BF16", UNET)
    tensors.update(typed(t5_only(), "BF16", "text_encoders.t5xxl.transformer."))
    tensors.update(typed(ldm_vae_shapes(16, quant_convs=False), "BF16", "vae."))
    identity = identify_file(write_header_only(tmp_path / "aio.safetensors", tensors))
    assert (identity.kind, identity.family, identity.facts["release"]) == ("checkpoint", "chroma", "Chroma1-HD")
    assert identity.components == ["transformer", "vae", "text_encoder"]
    assert identity.needs == [] and identity.part == "Chroma1-HD checkpoint"


def test_a_lone_t5_names_no_family_though_chroma_needs_only_it(tmp_path):
    identity = identify_file(write_header_only(tmp_path / "t5xxl.safetensors", typed(t5_only(), "F16")))
    assert (identity.kind, identity.family) == ("text-encoder", "unknown")


@pytest.mark.parametrize("convention, shapes", [("ldm", flux2_vae_shapes),
                                                ("diffusers", diffusers_flux2_vae_shapes)])
def test_flux2_vae_alone_is_named_by_its_latent_batch_norm(convention, shapes, tmp_path):
    identity = identify_file(write_header_only(tmp_path / "flux2-vae.safetensors", typed(shapes(), "BF16")))
    assert (identity.kind, identity.family, identity.key_convention) == ("vae", "flux2", convention)
    assert (identity.part, identity.nonstandard) == ("FLUX.2 VAE", False)
    assert identity.facts["vae"]["latent_norm_channels"] == 128 and identity.facts["latent_channels"] == 32


def test_a_32_channel_vae_without_batch_norm_is_only_of_flux2_design(tmp_path):
    shapes = {n: s for n, s in flux2_vae_shapes().items() if not n.startswith("bn.")}
    identity = identify_file(write_header_only(tmp_path / "vae.safetensors", typed(shapes, "BF16")))
    assert (identity.kind, identity.family) == ("vae", "unknown")
    assert identity.facts["compatible_families"] == ["flux2"]
    assert identity.part == "32-channel VAE (FLUX.2 VAE design)"
    hinted = identify_file(write_header_only(tmp_path / "hinted.safetensors", typed(shapes, "BF16"),
                                             {"modelspec.architecture": "Flux.2-dev/vae"}))
    assert hinted.family == "flux2" and hinted.nonstandard
    assert any("no latent BatchNorm statistics" in note for note in hinted.notes)


def test_a_flux_vae_folder_is_flux1s_though_chroma_shares_it(tmp_path):
    """The VAE config's latent format (0.3611 / 0.1159) is FLUX.1's and Chroma's alike: one
    VAE, named after the family that made it."""
    from released import diffusers_vae_shapes

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16,
                                                    "scaling_factor": 0.3611, "shift_factor": 0.1159}))
    write_header_only(folder / "diffusion_pytorch_model.safetensors",
                      typed(diffusers_vae_shapes(16, quant_convs=False), "F32"))
    identity = identify_file(folder)
    assert (identity.kind, identity.family, identity.part) == ("vae", "flux", "FLUX VAE")


# --- Anima: Cosmos-Predict2's DiT with a text adapter, kept under `net.` ------------------------

def _without_net(shapes: dict) -> dict:
    return {name.removeprefix("net."): shape for name, shape in shapes.items()}


@pytest.mark.parametrize("prefix", ["", UNET])
def test_anima_in_the_names_comfyui_holds_it_under(prefix, shapes_of, tmp_path):
    """Without `net.` (ComfyUI's own names, ComfyUI-GGUF's, a ComfyUI checkpoint's
    `model.diffusion_model.`), the same release."""
    shapes = _without_net(shapes_of("Anima-2B", "ldm"))
    identity = identify_file(write_header_only(tmp_path / "m.safetensors", typed(shapes, "BF16", prefix)))
    assert (identity.kind, identity.family, identity.facts["release"]) == ("unet", "anima", "Anima-2B")
    assert identity.summary == "Anima-2B diffusion model, bf16; needs: Qwen3-0.6B, Qwen-Image VAE"


@pytest.mark.parametrize("strip", [False, True])
def test_a_tiny_anima_is_the_design_never_the_release(strip, tmp_path):
    from released import TINY_LISTINGS

    config, listing = TINY_LISTINGS["anima"]
    shapes = _without_net(listing(config)) if strip else listing(config)
    identity = identify_file(write_header_only(tmp_path / "tiny.safetensors", typed(shapes, "F32")))
    assert (identity.kind, identity.family, identity.key_convention) == ("unet", "anima", "ldm")
    assert "release" not in identity.facts and identity.facts["design"] == "Anima-2B"
    assert identity.part.endswith("diffusion model (Anima-2B design, non-standard dimensions)")


@pytest.mark.parametrize("strip", [False, True])
def test_cosmos_predict2_without_the_adapter_is_not_anima(strip, shapes_of, tmp_path):
    """Cosmos-Predict2-2B has every DiT key of Anima; only the adapter tells Anima."""
    shapes = {name: shape for name, shape in shapes_of("Anima-2B", "ldm").items()
              if not name.startswith("net.llm_adapter.")}
    shapes = _without_net(shapes) if strip else shapes
    identity = identify_file(write_header_only(tmp_path / "cosmos.safetensors", typed(shapes, "BF16")))
    assert identity.family == "unknown" and identity.facts.get("release") is None


def test_anima_metadata_names():
    from sdkit.arch.families import family_from_kohya_version, family_from_modelspec, modelspec_architecture

    assert family_from_modelspec("anima-preview/lora") == family_from_modelspec("anima-unknown") == "anima"
    assert family_from_kohya_version("anima") == "anima"
    assert modelspec_architecture("anima", adapter="lora") == "anima-preview/lora"
    assert FAMILIES["anima"].implementation == "https://huggingface.co/circlestone-labs/Anima"
