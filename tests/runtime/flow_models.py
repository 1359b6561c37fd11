"""Tiny random pipelines of the transformer families `sdkit sample` draws beyond FLUX.1,
saved as diffusers folders: the transformer, VAE and text-encoder sizes of diffusers' own
pipeline tests (tests/pipelines/{stable_diffusion_3,chroma,z_image}), tokenizers built
offline (toy-flux's CLIP and T5 tokenizers; a byte-level BPE for Qwen3) and the released
scheduler configs. Every text encoder's vocabulary is its tokenizer's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

TOY_FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux" / "diffusers"
SIZE = 32  # pixels

# the released scheduler_config.json of each family (stabilityai/stable-diffusion-3.5-large,
# lodestones/Chroma1-HD, Tongyi-MAI/Z-Image-Turbo)
SCHEDULERS = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "chroma": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
               "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "z-image": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "qwen-image": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                   "time_shift_type": "exponential"},
    "lumina2": {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False},
}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "chroma": "ChromaPipeline", "z-image": "ZImagePipeline",
             "qwen-image": "QwenImagePipeline", "lumina2": "Lumina2Pipeline"}
# two VAE levels (a factor of 2): single files of it convert both ways
_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 8], "layers_per_block": 1,
        "norm_num_groups": 4, "sample_size": SIZE}
# QWen's chat template reduced to what ZImagePipeline asks of it: a user turn, the
# assistant's turn opened, and an empty thinking block when thinking is off
_QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")


def _clip_encoder(vocab: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=vocab,
                            hidden_act="gelu", projection_dim=32)
    return CLIPTextModelWithProjection(config)


def _t5_encoder() -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=512,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    return T5EncoderModel(config)


def qwen_tokenizer(folder: Path) -> Any:
    """A byte-level BPE with Qwen's special tokens and a chat template, trained on a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a red circle", "a green cross", "a blue square on a yellow ground", "user assistant"],
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=512)
    tokenizer.chat_template = _QWEN_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def _modules(family: str, folder: Path) -> dict[str, Any]:
    import diffusers

    torch.manual_seed(0)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        vae = diffusers.AutoencoderKL(**_VAE, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
        clip_vocab = len(json.loads((TOY_FLUX / "tokenizer" / "vocab.json").read_text()))
        return {"transformer": transformer, "vae": vae, "text_encoder": _clip_encoder(clip_vocab),
                "text_encoder_2": _clip_encoder(clip_vocab), "text_encoder_3": _t5_encoder()}
    if family == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
            approximator_layers=1, approximator_num_channels=16)
        vae = diffusers.AutoencoderKL(**_VAE, latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
        return {"transformer": transformer, "vae": vae, "text_encoder": _t5_encoder()}
    if family == "qwen-image":
        return _qwen_image(folder)
    if family == "lumina2":
        return _lumina2(folder)
    from transformers import Qwen3Config, Qwen3Model

    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # made with torch.empty: fixed so that no NaN can come from them
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = diffusers.AutoencoderKL(**_VAE, latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    vocab = len(qwen_tokenizer(folder / "tokenizer"))
    encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, head_dim=8, vocab_size=vocab, max_position_embeddings=512))
    return {"transformer": transformer, "vae": vae, "text_encoder": encoder}


def _qwen_image(folder: Path) -> dict[str, Any]:
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4)
    vocab = len(qwen_tokenizer(folder / "tokenizer"))
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0}}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                                                               "num_heads": 2, "out_hidden_size": 16},
                              vocab_size=vocab)
    return {"transformer": transformer, "vae": vae, "text_encoder": Qwen2_5_VLForConditionalGeneration(config)}


def _lumina2(folder: Path) -> dict[str, Any]:
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    transformer = diffusers.Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8)
    # four levels: the pipeline takes the VAE's factor to be 8
    vae = diffusers.AutoencoderKL(**{**_VAE, "down_block_types": ["DownEncoderBlock2D"] * 4,
                                     "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8] * 4},
                                  latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    vocab = len(qwen_tokenizer(folder / "tokenizer"))
    encoder = Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                       num_hidden_layers=2, num_key_value_heads=2, sliding_window=2, vocab_size=vocab))
    return {"transformer": transformer, "vae": vae, "text_encoder": encoder}


_TOKENIZERS = {"sd3": {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer", "tokenizer_3": "tokenizer_2"},
               "chroma": {"tokenizer": "tokenizer_2"}, "z-image": {}, "qwen-image": {}, "lumina2": {}}


def write_flow_pipeline(folder: Path, family: str) -> Path:
    """A tiny random `family` pipeline as a diffusers folder."""
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": PIPELINES[family], "_diffusers_version": "0.42.1"}
    for name, module in _modules(family, folder).items():
        module.eval().save_pretrained(folder / name)
        index[name] = ["diffusers" if name in ("transformer", "vae") else "transformers", type(module).__name__]
    for name, source in _TOKENIZERS[family].items():
        shutil.copytree(TOY_FLUX / source, folder / name)
    for name in [n for n in index if n.startswith("text_encoder")]:
        tokenizer = name.replace("text_encoder", "tokenizer")
        index[tokenizer] = ["transformers", json.loads((folder / tokenizer / "tokenizer_config.json").read_text())
                            .get("tokenizer_class", "PreTrainedTokenizerFast")]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULERS[family]}))
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
