"""`sdkit sample` on the transformer families beyond FLUX.1 (SD3, Chroma, Z-Image,
Qwen-Image, Lumina 2): tiny
random pipelines (`flow_models.py`) draw the pixels diffusers' own pipeline draws from
the same folder, seed, steps and guidance; the split parts ComfyUI users keep (the
diffusion model converted by `sdkit convert --to single-file`, the text encoders, the VAE
in single-file names) and an all-in-one checkpoint draw the folder's picture; a LoRA at
runtime draws what diffusers' `load_lora_weights` draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import exit_code, run_sdkit
from flow_models import PIPELINES, SIZE, write_flow_pipeline
from PIL import Image

from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.lora import LoraRequest
from sdkit.runtime.sample.plan import PromptPlan
from sdkit.runtime.sample.sampler import Sampler, Settings

FAMILIES = ("sd3", "chroma", "z-image", "qwen-image", "lumina2")
PROMPT = "a red circle"
STEPS = 3
CFG = 4.0
# a LoRA's layers in each transformer, in diffusers names
LORA_LAYERS = {"sd3": ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"),
               "chroma": ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp"),
               "z-image": ("layers.0.attention.to_v", "layers.1.feed_forward.w2"),
               "qwen-image": ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"),
               "lumina2": ("layers.0.attn.to_k", "context_refiner.0.feed_forward.linear_2")}
# sdkit has no single-file map of Qwen-Image's VAE (Wan 2.1's design): its diffusers file is given
VAE_IN_DIFFUSERS_NAMES = ("qwen-image",)


class Parts:
    """A tiny family as a diffusers folder and as split single files."""

    def __init__(self, root: Path, family: str) -> None:
        self.family = family
        self.folder = write_flow_pipeline(root / "diffusers", family)
        self.diffusion_model = root / f"{family}.safetensors"
        self.vae = root / f"{family}-vae.safetensors"
        assert exit_code(["convert", str(self.folder / "transformer"), "--to", "single-file", "-o",
                          str(self.diffusion_model)]) == 0
        if family in VAE_IN_DIFFUSERS_NAMES:
            self.vae = self.folder / "vae" / "diffusion_pytorch_model.safetensors"
        else:
            assert exit_code(["convert", str(self.folder / "vae"), "--to", "single-file", "-o", str(self.vae)]) == 0
        # T5 first: which encoder a file is comes from its design; only encoders of one design
        # and width (the tiny CLIP-L and CLIP-G) are taken in the order given
        encoders = sorted(self.folder.glob("text_encoder*/model.safetensors"))
        self.text_encoders = sorted(encoders, key=lambda path: "t5" not in (path.parent / "config.json").read_text())


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request, tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp(request.param), request.param)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _draw(model, loras: tuple[LoraRequest, ...] = ()) -> np.ndarray:
    sampler = Sampler(model)
    settings = Settings(steps=STEPS, cfg=CFG, seed=2, width=SIZE, height=SIZE)
    try:
        return _pixels(sampler.generate(PromptPlan(PROMPT, loras, ()), settings)[0].image)
    finally:
        sampler.close()  # the model's own weights back


def _guidance(family: str) -> dict:
    """The same CFG scale as each pipeline takes it: Z-Image's less one (`pos + g * (pos -
    neg)`), Qwen-Image's as `true_cfg_scale`; T5's context as long as the tiny tokenizer
    says (16)."""
    if family == "z-image":
        return {"guidance_scale": CFG - 1}
    if family == "qwen-image":
        return {"true_cfg_scale": CFG}
    length = {"max_sequence_length": 16} if family in ("sd3", "chroma") else {}
    return {"guidance_scale": CFG, **length}


def _diffusers_picture(pipe, family: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(2), **_guidance(family)).images[0]
    return _pixels(image)


def _reference(parts: Parts):
    import diffusers

    return getattr(diffusers, PIPELINES[parts.family]).from_pretrained(parts.folder, local_files_only=True)


def test_a_folder_draws_what_diffusers_draws(parts):
    ours = _draw(load_model(parts.folder, flow=True))
    assert np.abs(ours - _diffusers_picture(_reference(parts), parts.family)).max() <= 1


def test_split_parts_draw_the_folders_picture_through_the_cli(parts, capsys, tmp_path):
    out = tmp_path / "parts.png"
    encoders = [option for path in parts.text_encoders for option in ("--text-encoder", str(path))]
    code, _out, err = run_sdkit(capsys, "sample", str(parts.diffusion_model), "--config", str(parts.folder),
                                "--vae", str(parts.vae), *encoders, "-p", PROMPT, "--cfg", str(CFG), "--steps",
                                str(STEPS), "--seed", "2", "--width", str(SIZE), "--height", str(SIZE), "-o", str(out))
    assert code == 0, err
    picture = Image.open(out)
    assert picture.text["parameters"].startswith(f"{PROMPT}\nSteps: {STEPS}, Sampler: Euler, Schedule type: Automatic, "
                                                 f"CFG scale: 4, Seed: 2, Size: {SIZE}x{SIZE}, Model hash: ")
    assert f"Model: {parts.family}, VAE hash: " in picture.text["parameters"]
    folder = _draw(load_model(parts.folder, flow=True))
    assert np.abs(_pixels(picture.convert("RGB")) - folder).max() == 0


def _random_lora(path: Path, transformer: torch.nn.Module, layers: tuple[str, ...]) -> Path:
    """A rank-4 LoRA in diffusers' peft names (`transformer.<layer>.lora_A.weight`)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    weights = transformer.state_dict()
    lora = {}
    for layer in layers:
        rows, columns = weights[layer + ".weight"].shape
        lora[f"transformer.{layer}.lora_A.weight"] = torch.randn(4, columns, generator=generator)
        lora[f"transformer.{layer}.lora_B.weight"] = torch.randn(rows, 4, generator=generator)
    save_file(lora, path)
    return path


def test_a_runtime_lora_draws_what_diffusers_load_lora_weights_draws(parts, tmp_path):
    reference = _reference(parts)
    lora = _random_lora(tmp_path / "lora.safetensors", reference.transformer, LORA_LAYERS[parts.family])
    reference.load_lora_weights(lora)
    reference.set_adapters(reference.get_active_adapters(), [0.7])
    model = load_model(parts.folder, flow=True)
    plain = _draw(model)
    ours = _draw(model, (LoraRequest(lora, "lora", 0.7, 0.7),))
    assert np.abs(ours - plain).max() > 20  # the LoRA shows
    assert np.abs(ours - _diffusers_picture(reference, parts.family)).max() <= 1


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("sd3-aio"), "sd3")


def test_an_sd3_all_in_one_checkpoint_draws_the_folders_picture(sd3, tmp_path):
    """Stability's all-in-one layout: the MMDiT under `model.diffusion_model.`, ComfyUI's
    `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`, the VAE under `first_stage_model.`."""
    from safetensors.torch import load_file, save_file

    prefixes = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}
    tensors = {f"model.diffusion_model.{k}": v for k, v in load_file(sd3.diffusion_model).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in load_file(sd3.vae).items()})
    for component, prefix in prefixes.items():
        tensors.update({prefix + k: v for k, v in load_file(sd3.folder / component / "model.safetensors").items()})
    save_file(tensors, tmp_path / "sd3-aio.safetensors")
    ours = _draw(load_model(tmp_path / "sd3-aio.safetensors", config=sd3.folder, flow=True))
    assert np.abs(ours - _draw(load_model(sd3.folder, flow=True))).max() == 0


def test_a_scaled_fp8_diffusion_model_draws_its_values(sd3, tmp_path):
    """ComfyUI's scaled fp8 file samples from the values its weights and scales stand for."""
    from safetensors.torch import load_file, save_file

    quantized = tmp_path / "fp8.safetensors"
    assert exit_code(["convert", str(sd3.diffusion_model), "--dtype", "fp8_e4m3fn", "--fp8-scaling", "scaled",
                      "-o", str(quantized)]) == 0
    tensors = load_file(quantized)
    plain = {name: value.float() * tensors[name[:-len("weight")] + "scale_weight"].float()
             if name.endswith(".weight") and name[:-len("weight")] + "scale_weight" in tensors else value
             for name, value in tensors.items() if not name.endswith(".scale_weight") and name != "scaled_fp8"}
    save_file(plain, tmp_path / "plain.safetensors")
    pictures = [_draw(load_model(path, config=sd3.folder, vae=sd3.vae, flow=True, text_encoders=sd3.text_encoders))
                for path in (quantized, tmp_path / "plain.safetensors")]
    assert np.array_equal(*pictures)


def test_a_missing_part_is_named_in_one_line(sd3):
    clip, t5 = sd3.folder / "text_encoder" / "model.safetensors", sd3.folder / "text_encoder_3" / "model.safetensors"
    with pytest.raises(SdkitError, match=r"has no text_encoder_2; a Stable Diffusion 3 model samples with CLIP-L, "
                                         r"CLIP-G, T5-XXL and the SD3 VAE"):
        load_model(sd3.diffusion_model, config=sd3.folder, vae=sd3.vae, flow=True, text_encoders=[clip, t5])
    with pytest.raises(SdkitError, match="has no vae"):
        load_model(sd3.diffusion_model, config=sd3.folder, flow=True, text_encoders=sd3.text_encoders)
    with pytest.raises(SdkitError, match="samples with --config DIR"):
        load_model(sd3.diffusion_model, vae=sd3.vae, flow=True, text_encoders=sd3.text_encoders)


def test_a_text_encoder_of_another_design_is_refused(sd3, tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    qwen = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=8, vocab_size=64))
    save_file(qwen.state_dict(), tmp_path / "qwen.safetensors")
    with pytest.raises(SdkitError, match="is not a text encoder of Stable Diffusion 3 "
                                         r"\(it needs CLIP-L, CLIP-G, T5-XXL and the SD3 VAE\)"):
        load_model(sd3.diffusion_model, config=sd3.folder, vae=sd3.vae, flow=True,
                   text_encoders=[*sd3.text_encoders, tmp_path / "qwen.safetensors"])


def test_clip_skip_is_refused_in_one_line(sd3, capsys, tmp_path):
    code, _out, err = run_sdkit(capsys, "sample", str(sd3.folder), "-p", PROMPT, "--steps", "1", "--clip-skip", "2",
                                "-o", str(tmp_path / "out.png"))
    assert code == 1
    assert err.strip() == ("sdkit: error: --clip-skip does not apply to Stable Diffusion 3 (its pipeline reads its "
                           "text encoders its own way)")
    assert not (tmp_path / "out.png").exists()


def test_without_a_scheduler_config_the_released_schedule_is_used(sd3, tmp_path):
    """stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json: shift 3, no
    resolution-dependent shift."""
    import json
    import shutil

    folder = shutil.copytree(sd3.folder, tmp_path / "no-scheduler", ignore=shutil.ignore_patterns("scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    del index["scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    model = load_model(folder, flow=True)
    assert model.scheduler_config == {"num_train_timesteps": 1000, "shift": 3.0}
    assert model.pipe.scheduler.config.shift == 3.0 and not model.pipe.scheduler.config.use_dynamic_shifting


def test_a_family_sample_does_not_draw_is_refused_in_one_line(capsys, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures" / "families"))
    from released import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "wan", "wan")
    capsys.readouterr()
    code, _out, err = run_sdkit(capsys, "sample", str(folder), "-p", PROMPT, "-o", str(tmp_path / "out.png"))
    assert code == 1
    assert err.startswith("sdkit: error: ") and "family wan cannot be sampled (supported: " in err
    assert "sd3" in err and "z-image" in err and len(err.strip().splitlines()) == 1


def test_an_sd3_lora_on_its_clip_encoders_draws_what_diffusers_draws(sd3, tmp_path):
    """diffusers' names for SD3's encoders (`text_encoder.` CLIP-L, `text_encoder_2.` CLIP-G)
    reach the pipeline's encoders as they reach diffusers'."""
    from safetensors.torch import save_file

    reference = _reference(sd3)
    generator = torch.Generator().manual_seed(3)
    lora = {}
    for component, layer in (("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
                             ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),
                             ("transformer", "transformer_blocks.0.attn.to_q")):
        rows, columns = getattr(reference, component).state_dict()[layer + ".weight"].shape
        lora[f"{component}.{layer}.lora_A.weight"] = torch.randn(4, columns, generator=generator)
        lora[f"{component}.{layer}.lora_B.weight"] = torch.randn(rows, 4, generator=generator)
    save_file(lora, tmp_path / "lora.safetensors")
    reference.load_lora_weights(tmp_path / "lora.safetensors")
    assert set(reference.get_list_adapters()) == {"transformer", "text_encoder", "text_encoder_2"}
    sampler = Sampler(load_model(sd3.folder, flow=True))
    plan = PromptPlan(PROMPT, (LoraRequest(tmp_path / "lora.safetensors", "lora"),), ())
    ours = sampler.generate(plan, Settings(steps=STEPS, cfg=CFG, seed=2, width=SIZE, height=SIZE))[0]
    assert np.abs(_pixels(ours.image) - _diffusers_picture(reference, "sd3")).max() <= 1
    (applied,) = sampler.applied_loras()
    assert (applied.mapped, applied.unmapped) == (3, {})  # every module of the file, encoders' included


@pytest.fixture(scope="module")
def z_image(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("z-image-bake"), "z-image")


def test_a_comfyui_lora_on_fused_layers_draws_the_baked_models_picture(z_image, capsys, tmp_path):
    """A LoRA in the original single-file names (Z-Image's fused `attention.qkv`), as ComfyUI
    keeps it: sampling with it draws the picture of the diffusion model `lora bake` bakes it into."""
    from safetensors.torch import load_file, save_file

    weights = load_file(z_image.diffusion_model)
    generator = torch.Generator().manual_seed(4)
    lora = {}
    for layer in ("layers.0.attention.qkv", "noise_refiner.0.feed_forward.w1"):
        rows, columns = weights[layer + ".weight"].shape
        lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, columns, generator=generator)
        lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(rows, 4, generator=generator)
    save_file(lora, tmp_path / "lora.safetensors")
    baked = tmp_path / "baked.safetensors"
    code, _out, err = run_sdkit(capsys, "lora", "bake", str(z_image.diffusion_model), f"{tmp_path / 'lora.safetensors'}:0.8",
                                "-o", str(baked))
    assert code == 0, err
    model = load_model(z_image.folder, flow=True)
    applied = _draw(model, (LoraRequest(tmp_path / "lora.safetensors", "lora", 0.8, 0.8),))
    assert np.abs(applied - _draw(model)).max() > 20
    from_baked = _draw(load_model(baked, config=z_image.folder, vae=z_image.vae, flow=True,
                                  text_encoders=z_image.text_encoders))
    assert np.abs(applied - from_baked).max() <= 1


def test_a_comfyui_flux_checkpoint_draws_the_folders_picture(capsys, tmp_path):
    """toy-flux's parts joined as ComfyUI keeps an all-in-one FLUX.1 (`model.diffusion_model.`,
    `text_encoders.clip_l|t5xxl.transformer.`, `vae.`) draw the picture of its diffusers folder."""
    toy = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux"
    if not (toy / "diffusers" / "model_index.json").is_file():
        pytest.skip("toy-flux not built (make fixtures)")
    checkpoint = tmp_path / "aio.safetensors"
    parts = [toy / "toy-flux.safetensors", toy / "toy-flux.clip_l.safetensors", toy / "toy-flux.t5xxl.safetensors",
             toy / "ae.safetensors"]
    assert run_sdkit(capsys, "join", *map(str, parts), "-o", str(checkpoint))[0] == 0
    ours = _draw(load_model(checkpoint, config=toy / "diffusers", flow=True))
    assert np.abs(ours - _draw(load_model(toy / "diffusers", flow=True))).max() <= 2  # the parts store fp16 weights


IMG2IMG = {"sd3": "StableDiffusion3Img2ImgPipeline", "chroma": "ChromaImg2ImgPipeline",
           "z-image": "ZImageImg2ImgPipeline", "qwen-image": "QwenImageImg2ImgPipeline"}


def test_img2img_draws_what_the_familys_img2img_pipeline_draws(parts, tmp_path):
    """`--init-image` / `--denoise` is the family's diffusers img2img pipeline at that strength;
    Lumina 2, which has none, is refused in one line."""
    import diffusers

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    sampler = Sampler(load_model(parts.folder, flow=True))
    settings = Settings(steps=4, cfg=CFG, seed=2, init_image=str(init), denoise=0.6)
    if parts.family not in IMG2IMG:
        with pytest.raises(SdkitError, match=f"--init-image and --hires-scale do not apply to {parts.family} "):
            sampler.generate(PromptPlan(PROMPT, (), ()), settings)
        return
    ours = _pixels(sampler.generate(PromptPlan(PROMPT, (), ()), settings)[0].image)
    reference = getattr(diffusers, IMG2IMG[parts.family]).from_pretrained(parts.folder, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(PROMPT, image=Image.open(init).convert("RGB"), strength=0.6, negative_prompt="",
                           num_inference_steps=4, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(2),
                           **_guidance(parts.family)).images[0]
    assert np.abs(ours - _pixels(theirs)).max() <= 1
