"""Full-size synthetic inputs for the benchmark report: checkpoints with the real SD1.5 /
SDXL names and shapes and random fp16 weights, a rank-32 kohya LoRA and a lone VAE for
each, and a local diffusers config folder (what `from_single_file` needs offline).

Names and shapes come from the diffusers UNet / VAE and transformers CLIP classes built
with the released models' configs on the meta device, mapped to LDM single-file names
by `sdkit.arch.keymaps.checkpoint_to_ldm`; nothing is downloaded. Files are written by
sdkit's streaming writer into the cache folder and reused while their header matches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, open_model, write_safetensors

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest are UNet2DConditionModel's defaults
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

LORA_RANK = 32
UNET_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CLIP_LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# kohya prefixes of each component (SDXL numbers its text encoders)
KOHYA_PREFIXES = {"sd15": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                  "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def meta_modules(family: str) -> dict[str, torch.nn.Module]:
    """The released model's components, on the meta device (names and shapes, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if family == "sd15":
            return {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**VAE),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        return {"unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**VAE, scaling_factor=0.13025),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, projection_dim=768)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))}


def component_config(module: torch.nn.Module) -> dict[str, Any]:
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(raw, default=str))


@dataclass(frozen=True)
class LdmLayout:
    """LDM names and shapes of a model, and where each diffusers weight lands (LDM key
    and, for fused attention projections, its rows)."""

    shapes: dict[str, tuple[int, ...]]
    placement: dict[str, tuple[str, tuple[int, int] | None]]


def ldm_layout(modules: dict[str, torch.nn.Module]) -> LdmLayout:
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    state = {f"{name}/{key}": value for name, module in modules.items()
             for key, value in module.state_dict().items()}
    plan = checkpoint_to_ldm(state, {name: component_config(m) for name, m in modules.items()}).plan
    shapes = {key: tuple(value.shape) for key, value in convert_state_dict(plan, state).items()}
    placement: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for key, recipe in plan.items():
        if recipe.kind in ("copy", "reshape"):
            placement[recipe.sources[0]] = (key, None)
        elif recipe.kind == "concat":  # OpenCLIP's fused q/k/v projection
            start = 0
            for source in recipe.sources:
                rows = state[source].shape[0]
                placement[source] = (key, (start, start + rows))
                start += rows
    return LdmLayout(shapes, placement)


def _random(shape: tuple[int, ...], seed: int, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        if name.endswith("position_ids"):
            return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
    return load


def cached_file(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> Path:
    """A safetensors file of seeded random fp16 tensors (int64 position ids), reused when
    one with these names and shapes is already there."""
    try:
        with open_model(path) as model:
            if {name: info.shape for name, info in model.infos.items()} == shapes:
                return path
    except SdkitError:
        pass
    tensors = {name: LazyTensor("I64" if name.endswith("position_ids") else "F16", shape,
                                _random(shape, seed * 100_000 + index, name))
               for index, (name, shape) in enumerate(sorted(shapes.items()))}
    started = time.perf_counter()
    write_safetensors(path, tensors, {"format": "pt"}, overwrite=True)
    print(f"built {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s")
    return path


def lora_layers(family: str, modules: dict[str, torch.nn.Module]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """kohya module name -> (diffusers weight key, weight shape) of every LoRA target."""
    layers = {}
    for component, prefix in KOHYA_PREFIXES[family].items():
        suffixes = UNET_LORA_LAYERS if component == "unet" else CLIP_LORA_LAYERS
        for name, module in modules[component].named_modules():
            if name.endswith(suffixes):
                layers[prefix + name.replace(".", "_")] = (f"{component}/{name}.weight", tuple(module.weight.shape))
    return layers


def lora_shapes(layers: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (_, (out_features, in_features, *kernel)) in layers.items():
        shapes[f"{module}.lora_down.weight"] = (LORA_RANK, in_features, *kernel)
        shapes[f"{module}.lora_up.weight"] = (out_features, LORA_RANK, *(1,) * len(kernel))
        shapes[f"{module}.alpha"] = ()
    return shapes


def cached_lora(path: Path, layers: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """A kohya LoRA of rank LORA_RANK, alpha LORA_RANK / 2, over `layers`."""
    shapes = lora_shapes(layers)
    try:
        with open_model(path) as model:
            if {name: info.shape for name, info in model.infos.items()} == shapes:
                return path
    except SdkitError:
        pass
    tensors = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        if name.endswith(".alpha"):
            tensors[name] = LazyTensor("F16", shape, lambda: torch.tensor(LORA_RANK / 2, dtype=torch.float16))
        else:
            tensors[name] = LazyTensor("F16", shape, _random(shape, 7_000_000 + index, name))
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
                                      "ss_network_alpha": str(LORA_RANK / 2)}, overwrite=True)
    return path


def write_config_folder(folder: Path, family: str, modules: dict[str, torch.nn.Module]) -> Path:
    """model_index.json, component configs, a scheduler and a small CLIP tokenizer: what
    diffusers' `from_single_file(config=folder)` reads instead of the Hub."""
    from diffusers import EulerDiscreteScheduler

    if (folder / "model_index.json").is_file():
        return folder
    index: dict[str, Any] = {"_class_name": PIPELINES[family], "_diffusers_version": "0.30.0",
                             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for name, module in modules.items():
        library = "diffusers" if name in ("unet", "vae") else "transformers"
        index[name] = [library, type(module).__name__]
        (folder / name).mkdir(parents=True, exist_ok=True)
        if library == "diffusers":
            module.save_config(folder / name)
        else:
            module.config.save_pretrained(folder / name)
        if name.startswith("text_encoder"):
            tokenizer = name.replace("text_encoder", "tokenizer")
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
            _write_tokenizer(folder / tokenizer)
    if family == "sd15":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    EulerDiscreteScheduler().save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer without merges (enough to build the pipeline offline)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    characters = [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), "utf-8")


@dataclass(frozen=True)
class BenchInputs:
    """Everything one family's benchmarks read."""

    family: str
    a: Path  # the base checkpoint
    b: Path  # a second checkpoint (the "fine-tune" for LoRA extraction)
    c: Path  # a third, for three-model merges
    lora: Path  # rank-32 kohya LoRA
    lora_map: Path  # JSON: kohya module -> [LDM key, rows or null], for the full-load reference bake
    vae: Path  # LDM VAE alone (encoder.*, decoder.*, ...)
    config: Path  # local diffusers config folder


def build_inputs(cache: Path, family: str) -> BenchInputs:
    """Build (or reuse) every input of `family` ("sd15" or "sdxl") in `cache`."""
    modules = meta_modules(family)
    layout = ldm_layout(modules)
    checkpoints = [cached_file(cache / f"{family}-{name}-fp16.safetensors", layout.shapes, seed)
                   for seed, name in enumerate("abc", start=1)]
    vae_shapes = {key.removeprefix("first_stage_model."): shape for key, shape in layout.shapes.items()
                  if key.startswith("first_stage_model.")}
    vae = cached_file(cache / f"{family}-vae-fp16.safetensors", vae_shapes, seed=9)
    layers = lora_layers(family, modules)
    lora = cached_lora(cache / f"{family}-lora-r{LORA_RANK}.safetensors", layers)
    lora_map = cache / f"{family}-lora-r{LORA_RANK}.map.json"
    lora_map.write_text(json.dumps({module: layout.placement[key] for module, (key, _) in layers.items()}))
    config = write_config_folder(cache / f"{family}-config", family, modules)
    return BenchInputs(family, *checkpoints, lora, lora_map, vae, config)
