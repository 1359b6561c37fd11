"""Reading textual-inversion files of every layout into one `Embedding`, with diffusers'
own state-dict reader as the oracle for the token and vectors it finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdkit.adapters.embedding import embedding_from_model, read_embedding, vector_tokens
from sdkit.errors import SdkitError
from sdkit.io import model_from_tensors


def diffusers_reading(path: Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors as (n, dim)) as diffusers' textual-inversion loader finds them."""
    from diffusers.loaders.textual_inversion import (
        TextualInversionLoaderMixin,
        load_textual_inversion_state_dicts,
    )

    class NoVocabulary:
        def get_vocab(self) -> dict[str, int]:
            return {}

    state = load_textual_inversion_state_dicts([str(path)])
    tokens, embeddings = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings(
        [token], state, NoVocabulary())
    return tokens[0], embeddings[0].reshape(-1, embeddings[0].shape[-1]).float()


def test_a1111_pt(tmp_path: Path) -> None:
    vectors = torch.randn(4, 768)
    path = tmp_path / "charturner.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "turner-v1",
                "step": 1500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "sd15"}, path)
    embedding = read_embedding(path)
    their_token, their_vectors = diffusers_reading(path)
    assert torch.equal(embedding.vectors["text_encoder"], their_vectors)
    # A1111 triggers on the file name; diffusers takes the stored name
    assert (embedding.token, embedding.stored_name) == ("charturner", their_token)
    assert (embedding.layout, embedding.step, embedding.checkpoint_name) == ("a1111", 1500, "sd15")
    assert embedding.fits[0] == "sd1"


def test_kohya_emb_params_in_fp16(tmp_path: Path) -> None:
    vectors = torch.randn(2, 1024).half()
    path = tmp_path / "sd2-style.safetensors"
    save_file({"emb_params": vectors}, path)
    embedding = read_embedding(path)
    _, their_vectors = diffusers_reading(path, token="sd2-style")  # diffusers needs the token here
    assert torch.equal(embedding.vectors["text_encoder"], their_vectors)
    assert embedding.vectors["text_encoder"].dtype == torch.float32 and embedding.dtype == "F16"
    assert (embedding.token, embedding.layout, embedding.fits[0]) == ("sd2-style", "kohya", "sd2")


@pytest.mark.parametrize("name,shape", [("learned_embeds.bin", (768,)),
                                        ("learned_embeds.safetensors", (3, 768))])
def test_diffusers_learned_embeds(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    vectors = torch.randn(*shape)
    path = tmp_path / name
    if path.suffix == ".bin":
        torch.save({"<cat-toy>": vectors}, path)
    else:
        save_file({"<cat-toy>": vectors}, path)
    embedding = read_embedding(path)
    their_token, their_vectors = diffusers_reading(path)
    assert embedding.token == their_token == "<cat-toy>"
    assert torch.equal(embedding.vectors["text_encoder"], their_vectors)
    assert embedding.vector_count == (shape[0] if len(shape) == 2 else 1)


def test_sdxl_clip_l_and_clip_g(tmp_path: Path) -> None:
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    path = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    embedding = read_embedding(path, token="<xl>")
    assert torch.equal(embedding.vectors["text_encoder"], clip_l)
    assert torch.equal(embedding.vectors["text_encoder_2"], clip_g)
    assert embedding.token == "<xl>" and embedding.fits[0] == "sdxl-base"
    assert embedding.widths == {"text_encoder": 768, "text_encoder_2": 1280}


def test_parameter_dict_fallback_name() -> None:
    vectors = torch.randn(1, 768)
    model = model_from_tensors({"string_to_param._parameters.*": vectors}, path="old-torch.pt")
    embedding = embedding_from_model(model)
    assert torch.equal(embedding.vectors["text_encoder"], vectors) and embedding.token == "old-torch"


def test_multi_vector_tokens_follow_diffusers() -> None:
    assert vector_tokens("tok", 3) == ["tok", "tok_1", "tok_2"]
    assert vector_tokens("tok", 1) == ["tok"]


@pytest.mark.parametrize("tensors,message", [
    ({"lora_unet_down.lora_down.weight": torch.randn(4, 8, 2, 2)}, "not a textual-inversion embedding"),
    ({"string_to_param.*": torch.randn(1, 768), "string_to_param.+": torch.randn(1, 768)},
     "holds 2 entries"),
    ({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, "different numbers of vectors"),
    ({"emb_params": torch.full((1, 768), float("nan"))}, "NaN or Inf"),
    ({"emb_params": torch.zeros(1, 2, 768)}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(0, 768)}, "holds no vectors"),
])
def test_refusals(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(SdkitError, match=message):
        read_embedding(path)


def test_blank_token_refused(tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, path)
    with pytest.raises(SdkitError, match="cannot be a token"):
        read_embedding(path, token=" padded ")


@pytest.mark.parametrize("tensors,family,encoder", [
    ({"emb_params": torch.randn(1, 768)}, "sd1", "CLIP ViT-L/14"),
    ({"emb_params": torch.randn(2, 1024)}, "sd2", "OpenCLIP ViT-H/14"),
    ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, "sdxl-base", "ViT-bigG/14"),
    ({"emb_params": torch.randn(1, 32)}, "unknown", "width 32"),
])
def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str], tensors: dict[str, torch.Tensor],
                     family: str, encoder: str) -> None:
    import sdkit.cli.embed_cmd  # noqa: F401  (attaches the group)
    from sdkit.cli.main import main

    path = tmp_path / "thing.safetensors"
    save_file(tensors, path)
    main(["embed", "inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == family and encoder in report["text_encoder"]
    assert report["vectors"] == next(iter(tensors.values())).shape[0]
    assert report["widths"] == {name: t.shape[1] for name, t in zip(
        ["text_encoder", "text_encoder_2"], tensors.values())}
    main(["embed", "inspect", str(path)])
    assert "thing" in capsys.readouterr().out
