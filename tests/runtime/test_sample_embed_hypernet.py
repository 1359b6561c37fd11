"""Textual-inversion embeddings and hypernetworks at sampling time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime_models import TEXT_WIDTH, draw, max_difference, pixels
from sdkit.adapters.hypernet import HypernetworkSettings, new_hypernetwork, save_hypernetwork
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.plan import AdapterArgs


def _embedding(path, vectors: int = 2, width: int = TEXT_WIDTH, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    save_file({"emb_params": torch.randn(vectors, width, generator=generator)}, str(path))
    return path


@pytest.fixture(scope="module")
def model(sd1):
    return load_model(sd1.file)


def test_a_used_embedding_changes_the_picture_and_an_unused_one_does_not(model, tmp_path):
    embedding = _embedding(tmp_path / "mystyle.safetensors")
    args = AdapterArgs(embeddings=[str(embedding)])
    plain = draw(model, "a photo")[0]
    assert max_difference(draw(model, "a photo", adapters=args)[0], plain) == 0
    assert max_difference(draw(model, "a mystyle photo", adapters=args)[0],
                          draw(model, "a mystyle photo")[0]) > 10


def test_embedding_draws_what_diffusers_textual_inversion_draws(sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdkit.runtime.sample.scheduler import make_scheduler

    embedding = _embedding(tmp_path / "mystyle.safetensors", vectors=3, seed=2)
    peer = StableDiffusionPipeline.from_pretrained(sd1.folder, local_files_only=True)
    peer.set_progress_bar_config(disable=True)
    peer.load_textual_inversion(str(embedding), token="mystyle")
    peer.scheduler = make_scheduler("euler", dict(peer.scheduler.config))
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    with torch.no_grad():
        theirs = peer("a mystyle photo", negative_prompt="", num_inference_steps=4, guidance_scale=6.0,
                      width=32, height=32, latents=latents, generator=generator).images[0]
    ours = draw(load_model(sd1.file), "a mystyle photo", seed=3, scheduler="euler",
                adapters=AdapterArgs(embeddings=[f"{embedding}:mystyle"]))[0]
    assert max_difference(ours, pixels(theirs)) <= 1


def test_an_embedding_name_that_is_a_word_does_not_replace_the_word(model, tmp_path):
    # "photo" is one token of the tiny vocabulary; the embedding must not overwrite its row
    table = model.pipe.text_encoder.get_input_embeddings().weight
    photo = model.pipe.tokenizer.convert_tokens_to_ids("photo</w>")
    before = table[photo].clone()
    embedding = _embedding(tmp_path / "photo.safetensors", seed=4)
    draw(model, "a cat", adapters=AdapterArgs(embeddings=[str(embedding)]))
    assert torch.equal(model.pipe.text_encoder.get_input_embeddings().weight[photo], before)


def test_an_embedding_for_another_width_is_refused_in_one_line(model, tmp_path):
    embedding = _embedding(tmp_path / "wide.safetensors", width=768)
    with pytest.raises(SdkitError, match="made for another model family") as caught:
        draw(model, "a wide photo", adapters=AdapterArgs(embeddings=[str(embedding)]))
    assert "\n" not in str(caught.value)


def test_sdxl_embedding_fills_both_text_encoders(sdxl, tmp_path):
    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "xlstyle.safetensors"
    save_file({"clip_l": torch.randn(2, TEXT_WIDTH, generator=generator),
               "clip_g": torch.randn(2, TEXT_WIDTH, generator=generator)}, str(path))
    model = load_model(sdxl.file)
    plain = draw(model, "a xlstyle photo")[0]
    used = draw(model, "a xlstyle photo", adapters=AdapterArgs(embeddings=[str(path)]))[0]
    assert max_difference(used, plain) > 10
    rows = [getattr(model.pipe, c).get_input_embeddings().weight for c in ("text_encoder", "text_encoder_2")]
    ids = model.pipe.tokenizer.convert_tokens_to_ids(["<sdkit-ti-0-0>"])
    stored = load_file(path)
    assert torch.equal(rows[0][ids[0]], stored["clip_l"][0]) and torch.equal(rows[1][ids[0]], stored["clip_g"][0])


def _hypernet(path, sizes=(TEXT_WIDTH, 64)):
    generator = torch.Generator().manual_seed(7)
    hn = new_hypernetwork("hn", sizes, HypernetworkSettings(weight_init="XavierNormal"), generator=generator)
    save_hypernetwork(path, hn)
    return path


def test_hypernetwork_changes_the_picture_and_at_strength_zero_does_not(model, tmp_path):
    hn = _hypernet(tmp_path / "hn.pt")
    plain = draw(model, "a photo")[0]
    assert max_difference(draw(model, "a photo", adapters=AdapterArgs(hypernets=[f"{hn}:0"]))[0], plain) == 0
    assert max_difference(draw(model, "a photo", adapters=AdapterArgs(hypernets=[f"{hn}:1"]))[0], plain) > 10
    # detached again once the sampler closes
    assert max_difference(draw(model, "a photo")[0], plain) == 0


def test_hypernetwork_strength_is_what_a1111_multiplies(model, tmp_path):
    """h(x) = x + mlp(x) * strength: strength 2 differs from 1."""
    hn = _hypernet(tmp_path / "hn.pt")
    one = draw(model, "a photo", adapters=AdapterArgs(hypernets=[f"{hn}:1"]))[0]
    two = draw(model, "a photo", adapters=AdapterArgs(hypernets=[f"{hn}:2"]))[0]
    assert max_difference(one, two) > 5
