"""Small model files for the fault tests: SD1-layout checkpoints with every real key
(1125 tensors, about 12 MB in fp32, so a write takes long enough to be interrupted),
kohya LoRAs for them, a lone VAE, an embedding and a CLIP tokenizer folder.

Names and shapes come from the peers' own classes (diffusers UNet / VAE, transformers
CLIP) built on the meta device at toy widths and mapped to LDM names by sdkit's key maps;
the values are seeded random numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TEXT_WIDTH = 32
TEXT_ROWS = 600  # token-embedding rows; the tokenizer below has fewer tokens
CLIP_LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")


def _config(module: Any) -> dict[str, Any]:
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(raw, default=str))


def sd1_modules() -> dict[str, torch.nn.Module]:
    """The SD1 UNet / VAE / CLIP structure (levels, depths, attention placement) at toy widths,
    on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                                    attention_head_dim=4, cross_attention_dim=TEXT_WIDTH, sample_size=8)
        vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=TEXT_ROWS, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=12, num_attention_heads=4, max_position_embeddings=77,
            hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return {"unet": unet, "vae": vae, "text_encoder": clip}


def ldm_shapes(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """LDM single-file names and shapes of diffusers-layout modules."""
    from sdkit.arch.keymaps import checkpoint_to_ldm, convert_state_dict

    state = {f"{name}/{key}": value for name, module in modules.items()
             for key, value in module.state_dict().items()}
    plan = checkpoint_to_ldm(state, {name: _config(module) for name, module in modules.items()})
    return {key: tuple(value.shape) for key, value in convert_state_dict(plan.plan, state).items()}


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("position_ids"):
            tensors[name] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.05
    return tensors


def kohya_lora(modules: dict[str, torch.nn.Module], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA for the UNet attention and the text encoder layers of `modules`."""
    generator = torch.Generator().manual_seed(seed)
    layers = [("lora_unet_", name, module) for name, module in modules["unet"].named_modules()
              if name.endswith(UNET_LORA_LAYERS)]
    layers += [("lora_te_", name, module) for name, module in modules["text_encoder"].named_modules()
               if name.endswith(CLIP_LORA_LAYERS)]
    state: dict[str, torch.Tensor] = {}
    for prefix, name, module in layers:
        key = prefix + name.replace(".", "_")
        out_features, in_features = module.weight.shape[:2]
        kernel = tuple(module.weight.shape[2:])
        state[f"{key}.lora_down.weight"] = torch.randn((rank, in_features, *kernel), generator=generator) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn((out_features, rank, *(1,) * len(kernel)),
                                                     generator=generator) * 0.1
        state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer folder: byte-level vocabulary, no merges, fewer tokens than TEXT_ROWS."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [256 + index for index in range(256 - len(kept))]
    characters = [chr(code) for code in kept + extra]
    tokens = characters + [c + "</w>" for c in characters[:64]] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), "utf-8")
    return folder


def build_fault_models(folder: Path) -> dict[str, Path]:
    """Every input the writing commands need, in `folder`."""
    modules = sd1_modules()
    shapes = ldm_shapes(modules)
    paths = {"a": folder / "a.safetensors", "b": folder / "b.safetensors",
             "lora": folder / "lora.safetensors", "lora2": folder / "lora2.safetensors",
             "vae": folder / "vae.safetensors", "embedding": folder / "style.safetensors"}
    save_file(random_tensors(shapes, seed=1), str(paths["a"]))
    save_file(random_tensors(shapes, seed=2), str(paths["b"]))
    save_file(kohya_lora(modules, rank=4, seed=3), str(paths["lora"]))
    save_file(kohya_lora(modules, rank=4, seed=4), str(paths["lora2"]))
    vae_shapes = {key.removeprefix("first_stage_model."): shape for key, shape in shapes.items()
                  if key.startswith("first_stage_model.")}
    save_file(random_tensors(vae_shapes, seed=5), str(paths["vae"]))
    save_file({"emb_params": torch.randn(2, TEXT_WIDTH)}, str(paths["embedding"]))
    paths["tokenizer"] = write_tokenizer(folder / "pipeline" / "tokenizer").parent
    paths["config"] = folder / "config"  # the --config of a diffusers conversion: component configs
    for name, module in modules.items():
        (paths["config"] / name).mkdir(parents=True)
        (paths["config"] / name / "config.json").write_text(json.dumps(_config(module)), "utf-8")
    return paths
