"""Tiny SD1 and SDXL-layout pipelines and embedding files for the embedding tests.

The pipelines (CLIP text encoders of width 32 and 48) use a real `CLIPTokenizer` written
from a vocab.json + merges.txt, as the hub's SD repositories ship them; the text
encoders have as many rows as the tokenizer has tokens, like real CLIP. Embedding files
are written the way each producer writes them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from sdkit.adapters.embedding import read_embedding
from sdkit.ops.embed.add import EmbeddingRequest

PROMPT = "a photo of {}"
SD1_TOKEN_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_TOKEN_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                   "conditioner.embedders.1.model.token_embedding.weight")
MERGES = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>")]


@pytest.fixture(autouse=True, scope="module")
def quiet_peers():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield


def byte_characters() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = kept[:], 0
    for byte in range(256):
        if byte not in kept:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tokenizer(folder: Path, pad_token: str) -> int:
    """A CLIP tokenizer folder as SD hub repositories hold it; returns its token count."""
    characters = byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m) for m in MERGES] \
        + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}), "utf-8")
    return len(tokens)


def text_config(vocab: int, width: int, **extra: object):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1, **extra)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=2)


def tiny_unet(context: int, **extra: object):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=context, norm_num_groups=2, **extra)


def save_with_hub_tokenizers(pipe, root: Path, pads: dict[str, str]) -> Path:
    pipe.save_pretrained(root)
    for name, pad in pads.items():
        shutil.rmtree(root / name)
        write_tokenizer(root / name, pad)
    return root



def build_sd1_pipeline(scratch: Path, root: Path) -> Path:
    """A tiny SD1 pipeline saved at `root` (`scratch`: a folder for the tokenizer it starts from)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(scratch / "tokenizer", "<|endoftext|>")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(vocab, 32)),
        tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"), unet=tiny_unet(32),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return save_with_hub_tokenizers(pipe, root, {"tokenizer": "<|endoftext|>"})


def build_sdxl_pipeline(scratch: Path, root: Path) -> Path:
    """A tiny SDXL pipeline saved at `root` (`scratch`: a folder for the tokenizers it starts from)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = write_tokenizer(scratch / "tokenizer", "<|endoftext|>")
    write_tokenizer(scratch / "tokenizer_2", "!")
    torch.manual_seed(1)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(vocab, 32)),
        text_encoder_2=CLIPTextModelWithProjection(
            text_config(vocab, 48, projection_dim=48, hidden_act="gelu")),
        tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(scratch / "tokenizer_2"),
        unet=tiny_unet(80, attention_head_dim=(2, 4), use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=6 * 8 + 48),
        scheduler=EulerDiscreteScheduler())
    return save_with_hub_tokenizers(pipe, root, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})


def load_sd1(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def load_sdxl(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


# embedding files, written the way each producer writes them
def a1111_pt(path: Path, vectors: torch.Tensor) -> None:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "stored",
                "step": 100, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "base"}, path)


def kohya_safetensors(path: Path, vectors: torch.Tensor) -> None:
    save_file({"emb_params": vectors}, path, metadata={"ss_output_name": path.stem})


def diffusers_bin(path: Path, vectors: torch.Tensor) -> None:
    torch.save({"<concept>": vectors.squeeze(0)}, path)


def diffusers_safetensors(path: Path, vectors: torch.Tensor) -> None:
    save_file({"<concept>": vectors.contiguous()}, path)


FORMATS: dict[str, tuple[str, Callable[[Path, torch.Tensor], None]]] = {
    "a1111": ("mystyle.pt", a1111_pt),
    "kohya": ("kohya-style.safetensors", kohya_safetensors),
    "diffusers-bin": ("learned_embeds.bin", diffusers_bin),
    "diffusers-safetensors": ("learned_embeds.safetensors", diffusers_safetensors),
}


def requests_for(*specs: tuple[Path, str | None]) -> list[EmbeddingRequest]:
    embeddings = [read_embedding(path, token) for path, token in specs]
    return [EmbeddingRequest(embedding, embedding.token) for embedding in embeddings]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: the same weights read from differently laid out files can
    take differently vectorised kernel paths; the tables themselves are compared exactly."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def sd1_prompt_embeds(pipe, token: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT.format(token), "cpu", 1, False)[0]


@pytest.fixture(scope="module")
def sd1_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd1_pipeline(tmp_path_factory.mktemp("sd1-tokenizer"), tmp_path_factory.mktemp("sd1") / "pipe")


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-tokenizer"), tmp_path_factory.mktemp("sdxl") / "pipe")
