"""Builders for the runtime tests: tiny SD1 and SDXL models (random weights, real layouts) in both file forms, adapter
files for them, and a drawing helper.

The models are small enough to sample in milliseconds yet follow the SD family
conventions that single files cannot state (32 norm groups, 8 attention heads), so their
single-file form loads without a config. Single files are written in float32 so both
forms hold the same numbers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

TEXT_WIDTH = 32
STEPS = 4
SIZE = 32  # pixels; the 2-level VAE makes that a 16x16 latent


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes keep their character."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with one merge per word the tests use often."""
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("c", "a"), ("ca", "t</w>")]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _clip(tokenizer, projection: bool, act: str, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=layers, num_attention_heads=8, hidden_act=act, layer_norm_eps=1e-5,
                            projection_dim=TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(sdxl: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.13025 if sdxl else 0.18215)


def _unet(sdxl: bool, linear: bool = False):
    from diffusers import UNet2DConditionModel

    settings: dict[str, Any] = dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, use_linear_projection=linear)
    if sdxl:
        settings.update(cross_attention_dim=2 * TEXT_WIDTH, use_linear_projection=True,
                        attention_head_dim=(8, 8), addition_embed_type="text_time",
                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH)
    return UNet2DConditionModel(**settings)


@dataclass(frozen=True)
class TinyModel:
    folder: Path  # diffusers pipeline folder
    file: Path  # LDM single file (float32) with a companion tokenizer folder
    family: str


def _single_file(folder: Path, path: Path, tokenizer_dir: Path, sdxl: bool,
                 full_text_encoder: Any = None) -> None:
    """The LDM single file of a pipeline folder; `full_text_encoder` stands in for the
    folder's (SD2 files keep the OpenCLIP layer diffusers leaves out)."""
    tensors, configs = {}, {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / component).is_dir():
            continue
        configs[component] = json.loads((folder / component / "config.json").read_text())
        weights = next((folder / component).glob("*.safetensors"))
        tensors.update({f"{component}/{k}": v for k, v in load_file(weights).items()})
    if full_text_encoder is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("text_encoder/")}
        tensors.update({f"text_encoder/{k}": v for k, v in full_text_encoder.state_dict().items()})
        configs["text_encoder"] = full_text_encoder.config.to_dict()
    plan = checkpoint_to_ldm(tensors, configs)
    save_file({k: v.contiguous() for k, v in convert_state_dict(plan.plan, tensors).items()}, str(path))
    companion = path.with_name(path.name + ".tokenizer")
    for sub in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        shutil.copytree(tokenizer_dir, companion / sub if sdxl else companion)


def build_tiny_model(root: Path, family: str) -> TinyModel:
    """A tiny "sd1", "sd2" or "sdxl-base" model as a diffusers folder and a single file."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = family == "sdxl-base"
    tokenizer_dir = root / "tokenizer-files"
    write_tokenizer(tokenizer_dir)
    tokenizer = _tokenizer(tokenizer_dir)
    torch.manual_seed(("sd1", "sd2", "sdxl-base").index(family))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    full_text_encoder = None
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=_vae(True), text_encoder=_clip(tokenizer, False, "quick_gelu"),
                                         text_encoder_2=_clip(tokenizer, True, "gelu"), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=_unet(True), scheduler=scheduler)
    else:
        text_encoder = _clip(tokenizer, False, "quick_gelu" if family == "sd1" else "gelu")
        if family == "sd2":  # diffusers' SD2 encoder stops at OpenCLIP's penultimate layer
            full_text_encoder = text_encoder
            text_encoder = _clip(tokenizer, False, "gelu", layers=2)
            text_encoder.load_state_dict(full_text_encoder.state_dict(), strict=False)
        pipe = StableDiffusionPipeline(vae=_vae(False), text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=_unet(False, linear=family == "sd2"), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
    folder = root / "diffusers"
    pipe.save_pretrained(folder)
    file = root / f"tiny-{family.removesuffix('-base')}.safetensors"
    _single_file(folder, file, tokenizer_dir, sdxl, full_text_encoder)
    return TinyModel(folder, file, family)


# ---- adapter files ---------------------------------------------------------------------------

def _attention_linears(module: torch.nn.Module, leaves: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name: layer for name, layer in module.named_modules()
            if name.endswith(leaves) and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}


def kohya_lora_tensors(pipe: Any, seed: int, algorithm: str = "lora", rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-named adapter (diffusers paths, as kohya names SD1 layers) over the UNet's
    attention / projection layers and the text encoder's attention, with visible weights."""
    generator = torch.Generator().manual_seed(seed)
    layers = {f"lora_unet_{n}": m for n, m in _attention_linears(
        pipe.unet, ("to_q", "to_k", "to_v", "to_out.0", "proj_in")).items()}
    layers.update({f"lora_te_text_model_{n}": m for n, m in _attention_linears(
        pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")).items()})
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        key = name.replace(".", "_")
        out, inner = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator) * 0.5
        if algorithm == "lora":
            tensors[f"{key}.lora_down.weight"] = rand(rank, inner, *kernel)
            tensors[f"{key}.lora_up.weight"] = rand(out, rank, *[1] * len(kernel))
        elif kernel:  # this LoHa covers the linear layers only
            continue
        else:
            for half in ("1", "2"):
                tensors[f"{key}.hada_w{half}_a"] = rand(out, rank)
                tensors[f"{key}.hada_w{half}_b"] = rand(rank, inner)
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return tensors


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


def ldm_kohya_lora(model_file: Path, text_folder: Path, seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya SDXL-style adapter: UNet layers named after their LDM (sgm) paths, taken
    from the single file's keys; both text encoders' attention with HF names."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in load_file(model_file).items()}
    targets = {}
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and key.endswith((".to_q.weight", ".to_k.weight",
                                                                       ".to_v.weight", ".to_out.0.weight")):
            targets["lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")] = shape
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        encoder = load_file(next((text_folder / component).glob("*.safetensors")))
        for key, tensor in encoder.items():
            if key.endswith(("q_proj.weight", "v_proj.weight")):
                bare = key.removeprefix("text_model.")[:-len(".weight")]
                targets[prefix + "text_model_" + bare.replace(".", "_")] = tuple(tensor.shape)
    tensors = {}
    for name, (out, inner) in targets.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inner, generator=generator) * 0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=generator) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


# ---- drawing ---------------------------------------------------------------------------------

def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def tiny_settings(**overrides: Any) -> Any:
    """Sampling settings for the tiny models: 4 steps, 32x32, cfg 6, seed 1."""
    from sdkit.runtime.sample.sampler import Settings

    return Settings(**{"steps": STEPS, "width": SIZE, "height": SIZE, "cfg": 6.0, "seed": 1, **overrides})


def draw(model: Any, prompt: str, *, count: int = 1, adapters: Any = None, library: Any = None,
         **settings: Any) -> list[np.ndarray]:
    """Pictures of `prompt` from a LoadedModel with `tiny_settings(**settings)`; `adapters`
    are command-line style (`AdapterArgs`)."""
    from sdkit.runtime.sample.sampler import Sampler
    from sdkit.runtime.sample.plan import AdapterArgs, resolve_adapters

    sampler = Sampler(model, library, resolve_adapters(adapters or AdapterArgs(), library))
    try:
        samples = sampler.generate(sampler.plan_prompt(prompt), tiny_settings(**settings), count)
    finally:
        sampler.close()
    return [pixels(sample.image) for sample in samples]


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())
