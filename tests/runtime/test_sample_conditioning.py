"""Prompt conditioning equals A1111's, computed here independently with transformers' CLIP
models: every chunk tokenized, wrapped and padded as A1111's `sd_hijack_clip` does, encoded,
multiplied by its token weights, rescaled to the batch's former mean (A1111's "Original"
emphasis) and joined along the tokens. The chunk contents of each row follow A1111's
documented attention pieces and its chunk rules (75 tokens, BREAK, commas up to 20 tokens
back). Prompt editing switches at the step A1111 switches at, and a plain prompt draws the
picture diffusers draws from the same text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_models import SIZE, STEPS, draw, max_difference, pixels

from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.conditioning import (
    encode_texts,
    paired_conditioning,
    prompt_conditioning,
    text_readers,
)
from sdkit.runtime.sample.text_inputs import own_lengths, scheduled_text

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
OPENCLIP_PAD = 0  # A1111's id_pad for OpenCLIP encoders (SD2, SDXL's second)

pytestmark = pytest.mark.skipif(not (TOY / "sdxl" / "diffusers" / "model_index.json").is_file(),
                                reason="toy fixtures not built (make fixtures)")

DOCUMENTED = [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
              (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
# (prompt, steps, the batch A1111 encodes: per schedule text, its chunks as (text, weight) pieces)
TABLE = [
    ("a red circle", 20, [[[("a red circle", 1.0)]]]),
    ("a (red) circle", 20, [[[("a ", 1.0), ("red", 1.1), (" circle", 1.0)]]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", 20, [[DOCUMENTED]]),
    ("[blue] square, (green:0.8)", 20, [[[("blue", 1 / 1.1), (" square, ", 1.0), ("green", 0.8)]]]),
    ("a red circle BREAK (a blue square:1.2)", 20, [[[("a red circle", 1.0)], [("a blue square", 1.2)]]]),
    ("(" + "a " * 80 + ":1.2)", 20, [[[("a " * 75, 1.2)], [("a " * 5, 1.2)]]]),
    ("a " * 70 + ", blue square red circle big", 20,
     [[[("a " * 70 + ",", 1.0)], [("blue square red circle big", 1.0)]]]),
    ("a [(red):blue:2] circle", 4, [[[("a ", 1.0), ("red", 1.1), (" circle", 1.0)]], [[("a blue circle", 1.0)]]]),
    ("[(a red circle) BREAK big:a blue square:2]", 4,
     [[[("a red circle", 1.1)], [("big", 1.0)]], [[("a blue square", 1.0)], []]]),
]


def _chunk(tokenizer, pieces, pad: int) -> tuple[list[int], list[float]]:
    ids, weights = [], []
    for text, weight in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [weight] * len(piece)
    assert len(ids) <= 75
    fill = 75 - len(ids)
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * fill
    return tokens, [1.0, *weights] + [1.0] * (fill + 1)


def _reference(tokenizer, model, batch, pad: int, layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled of chunk 0 or None) of a batch of chunk lists, A1111's way."""
    parts, pooled = [], None
    for index in range(len(batch[0])):
        rows = [_chunk(tokenizer, chunks[index], pad) for chunks in batch]
        ids = torch.tensor([tokens for tokens, _ in rows])
        weights = torch.tensor([w for _, w in rows]).unsqueeze(-1)
        with torch.no_grad():
            output = model(ids, output_hidden_states=True)
        z = layer(output)
        original = z.mean()
        z = z * weights
        z = z * (original / z.mean())
        parts.append(z)
        if index == 0 and hasattr(output, "text_embeds"):
            pooled = output.text_embeds
    return torch.cat(parts, dim=1), pooled


@pytest.fixture(scope="module")
def toy_sd1():
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = TOY / "sd1" / "diffusers"
    return (load_model(folder), CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"))


@pytest.fixture(scope="module")
def toy_sdxl():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = TOY / "sdxl" / "diffusers"
    return (load_model(folder), CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"))


def _batch_padded(batch):
    """Shorter texts of a batch get empty chunks ([] pieces), as A1111's forward adds them."""
    count = max(len(chunks) for chunks in batch)
    return [chunks + [[]] * (count - len(chunks)) for chunks in batch]


def _sd1_reference(toy, batch, clip_skip: int = 1) -> torch.Tensor:
    _, tokenizer, model = toy
    if clip_skip == 1:
        layer = lambda output: output.last_hidden_state
    else:
        norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 has no text_model level
        layer = lambda output: norm(output.hidden_states[-clip_skip])
    return _reference(tokenizer, model, _batch_padded(batch), tokenizer.eos_token_id, layer)[0]


def _sdxl_reference(toy, batch) -> tuple[torch.Tensor, torch.Tensor]:
    _, tokenizer, clip_l, clip_g = toy
    penultimate = lambda output: output.hidden_states[-2]
    batch = _batch_padded(batch)
    hidden_l, _ = _reference(tokenizer, clip_l, batch, tokenizer.eos_token_id, penultimate)
    hidden_g, pooled = _reference(tokenizer, clip_g, batch, OPENCLIP_PAD, penultimate)
    return torch.cat([hidden_l, hidden_g], dim=-1), pooled


def _ours(model, family: str, prompt: str, steps: int, clip_skip: int = 1):
    with torch.inference_mode():
        return prompt_conditioning(text_readers(model.pipe, family, clip_skip), prompt, steps)


@pytest.mark.parametrize("prompt, steps, batch", TABLE, ids=[row[0][:40] for row in TABLE])
def test_sd1_conditioning_equals_a1111s(toy_sd1, prompt, steps, batch):
    ours = _ours(toy_sd1[0], "sd1", prompt, steps)
    expected = _sd1_reference(toy_sd1, batch)
    assert ours.hidden.shape == expected.shape
    assert (ours.hidden - expected).abs().max() <= 1e-6
    assert ours.pooled is None


@pytest.mark.parametrize("prompt, steps, batch", TABLE, ids=[row[0][:40] for row in TABLE])
def test_sdxl_conditioning_equals_a1111s(toy_sdxl, prompt, steps, batch):
    ours = _ours(toy_sdxl[0], "sdxl-base", prompt, steps)
    hidden, pooled = _sdxl_reference(toy_sdxl, batch)
    assert ours.hidden.shape == hidden.shape and ours.pooled.shape == pooled.shape
    assert (ours.hidden - hidden).abs().max() <= 1e-6
    assert (ours.pooled - pooled).abs().max() <= 1e-6


def test_sd1_clip_skip_reads_an_earlier_layer_through_the_final_norm(toy_sd1):
    prompt, steps, batch = TABLE[2]
    ours = _ours(toy_sd1[0], "sd1", prompt, steps, clip_skip=2)
    assert (ours.hidden - _sd1_reference(toy_sd1, batch, clip_skip=2)).abs().max() <= 1e-6


def test_the_shorter_side_is_filled_with_the_empty_prompt(toy_sd1, toy_sdxl):
    long_prompt = "a red circle BREAK a blue square"
    model = toy_sd1[0]
    with torch.inference_mode():
        positive, negative = paired_conditioning(text_readers(model.pipe, "sd1", 1), long_prompt, "", 20, False)
    empty = _sd1_reference(toy_sd1, [[[]]])
    assert positive.hidden.shape[1] == negative.hidden.shape[1] == 154
    assert (negative.hidden - torch.cat([empty, empty], dim=1)).abs().max() <= 1e-6
    # SDXL: an empty negative prompt is zeros (pooled too), then filled the same way
    model = toy_sdxl[0]
    with torch.inference_mode():
        _, negative = paired_conditioning(text_readers(model.pipe, "sdxl-base", 1), long_prompt, "", 20, True)
    empty, _ = _sdxl_reference(toy_sdxl, [[[]]])
    assert torch.equal(negative.hidden[:, :77], torch.zeros_like(negative.hidden[:, :77]))
    assert (negative.hidden[:, 77:] - empty).abs().max() <= 1e-6
    assert torch.equal(negative.pooled, torch.zeros_like(negative.pooled))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_unet_attends_each_side_over_its_own_length_as_a1111_does(sd1, sdxl, family):
    """A1111 (by default) runs the UNet on prompt and negative prompt separately when their
    lengths differ; the filled batch with its attention mask must give the same outputs."""
    model = load_model((sd1 if family == "sd1" else sdxl).file)
    name = "sd1" if family == "sd1" else "sdxl-base"
    pipe = model.pipe
    with torch.inference_mode():
        text = scheduled_text(pipe, name, "a red photo BREAK a cat", "blurry", 1, STEPS, 1)
        arguments = text.arguments()
    negative, positive = arguments["negative_prompt_embeds"], arguments["prompt_embeds"]
    assert negative.shape == positive.shape and positive.shape[1] == 154
    assert (text.negative.length, text.positive.length) == (77, 154)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    pooled = [arguments.get("negative_pooled_prompt_embeds"), arguments.get("pooled_prompt_embeds")]

    def extra(rows: list) -> dict:
        """SDXL's added conditioning (pooled text and size ids) for these rows."""
        if family != "sdxl":
            return {}
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(len(rows), 1)
        return {"added_cond_kwargs": {"text_embeds": torch.cat(rows), "time_ids": time_ids}}

    with torch.inference_mode():
        with own_lengths(pipe, text):
            together = pipe.unet(torch.cat([latents, latents]), 500, encoder_hidden_states=torch.cat(
                [negative, positive]), **extra(pooled)).sample
        alone = [pipe.unet(latents, 500, encoder_hidden_states=negative[:, :77], **extra(pooled[:1])).sample,
                 pipe.unet(latents, 500, encoder_hidden_states=positive, **extra(pooled[1:])).sample]
        unmasked = pipe.unet(latents, 500, encoder_hidden_states=negative, **extra(pooled[:1])).sample
    assert "forward" not in pipe.unet.__dict__  # put back
    assert torch.allclose(together[0], alone[0][0], atol=1e-5) and torch.allclose(together[1], alone[1][0], atol=1e-5)
    assert (unmasked - alone[0]).abs().max() > 1e-3  # the filling would count without the mask


# ---- in the pipeline -----------------------------------------------------------------------------

def _unet_inputs(model):
    """Record the text conditioning the UNet is called with, call by call."""
    seen = []
    original = model.pipe.unet.forward

    def recording(*args, **kwargs):
        pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        seen.append((kwargs["encoder_hidden_states"].clone(), None if pooled is None else pooled.clone()))
        return original(*args, **kwargs)

    model.pipe.unet.forward = recording
    return seen, lambda: setattr(model.pipe.unet, "forward", original)


# "[red:cat:0.5]": A1111 spreads the schedule over its total_steps (second-order samplers:
# twice the steps) and call i (from 0) uses the first entry ending at or after i. Heun makes
# 2n-1 calls in both; diffusers' DPM++ SDE (a singlestep solver) makes one call where A1111
# makes two, so its iteration i stands for A1111's call 2i: iterations 0-2 (calls 0, 2, 4) red
@pytest.mark.parametrize("scheduler, calls, last_red", [("euler", STEPS, 2), ("heun", 2 * STEPS - 1, 4),
                                                        ("DPM++ SDE", STEPS, 2)])
def test_prompt_editing_switches_at_a1111s_step(sd1, scheduler, calls, last_red):
    model = load_model(sd1.file)
    with torch.inference_mode():
        readers = text_readers(model.pipe, "sd1", 1)
        red, _ = encode_texts(readers, ["a red photo"])
        cat, _ = encode_texts(readers, ["a cat photo"])
        negative, _ = encode_texts(readers, [""])
    seen, restore = _unet_inputs(model)
    try:
        draw(model, "a [red:cat:0.5] photo", scheduler=scheduler)
    finally:
        restore()
    assert len(seen) == calls
    for call, (batch, _) in enumerate(seen):
        expected = red if call <= last_red else cat
        assert torch.allclose(batch[0], negative[0], atol=1e-6) and torch.allclose(batch[1], expected[0], atol=1e-6)


def test_sdxl_editing_switches_the_pooled_vector_too(sdxl):
    model = load_model(sdxl.file)
    with torch.inference_mode():
        readers = text_readers(model.pipe, "sdxl-base", 1)
        red = encode_texts(readers, ["a red photo"])
        cat = encode_texts(readers, ["a cat photo"])
    seen, restore = _unet_inputs(model)
    try:
        draw(model, "a [red:cat:2] photo", scheduler="euler")
    finally:
        restore()
    for call, (batch, pooled) in enumerate(seen):
        hidden, vector = red if call <= 2 else cat
        assert torch.allclose(batch[1], hidden[0], atol=1e-6) and torch.allclose(pooled[1], vector[0], atol=1e-6)
        assert not batch[0].any() and not pooled[0].any()  # the empty negative prompt: zeros


def test_a_hires_pass_reads_edits_after_the_first_pass(sd1):
    from sdkit.runtime.sample.img2img import Hires

    model = load_model(sd1.file)
    with torch.inference_mode():
        readers = text_readers(model.pipe, "sd1", 1)
        red, _ = encode_texts(readers, ["a red photo"])
        cat, _ = encode_texts(readers, ["a cat photo"])
    seen, restore = _unet_inputs(model)
    try:
        draw(model, "a [red:cat:1.5] photo", scheduler="euler", hires=Hires(scale=2.0, steps=STEPS, denoise=0.5))
    finally:
        restore()
    # A1111: 1.5 is past the first pass (red throughout) and halfway through the second:
    # (1.5 - 1) * 4 = step 2 of the hires pass, so its calls 0-2 are red and call 3 is cat
    expected = [red] * STEPS + [red, red, red, cat]
    assert len(seen) == len(expected)
    for (batch, _), words in zip(seen, expected):
        assert torch.allclose(batch[1], words[0], atol=1e-6)


def test_alternation_changes_every_step(sd1):
    model = load_model(sd1.file)
    with torch.inference_mode():
        text = scheduled_text(model.pipe, "sd1", "a [red|cat] photo", "", 1, STEPS, 1)
        readers = text_readers(model.pipe, "sd1", 1)
        words = {word: encode_texts(readers, [f"a {word} photo"])[0] for word in ("red", "cat")}
    # A1111: entries end at steps 1, 2, 3, 4 holding red, cat, red, cat; steps 0 and 1 both use the first
    for step, word in enumerate(["red", "red", "cat", "red"]):
        assert torch.allclose(text.positive.at(step)[0], words[word], atol=1e-6)


def _diffusers_picture(model, prompt: str, negative: str | None, **extra) -> object:
    from sdkit.runtime.sample.scheduler import make_scheduler

    pipe = model.pipe
    pipe.scheduler = make_scheduler("euler", model.scheduler_config)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((1, 4, 16, 16), generator=generator)
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=6.0,
                    width=SIZE, height=SIZE, latents=latents, generator=generator, **extra).images[0]


# SDXL with CLIP skip > 2 and a negative prompt is left out: diffusers reads the negative
# prompt's penultimate layer whatever `clip_skip` says, A1111 (and now sdkit) the same layer as the prompt's
@pytest.mark.parametrize("family, negative, clip_skip", [("sd1", "", 1), ("sd1", "blurry", 1), ("sd2", "blurry", 1),
                                                          ("sdxl", "", 1), ("sdxl", "blurry", 1), ("sdxl", "", 3)])
def test_a_plain_prompt_draws_what_the_pipeline_draws_from_the_text(sd1, sd2, sdxl, family, negative, clip_skip):
    """What sdkit drew before prompt syntax: the text handed to diffusers' own encoding."""
    model = load_model({"sd1": sd1, "sd2": sd2, "sdxl": sdxl}[family].file)
    extra = {"clip_skip": clip_skip - 2} if clip_skip > 2 else {}
    theirs = pixels(_diffusers_picture(model, "a red photo", negative or None, **extra))
    ours = draw(model, "a red photo", scheduler="euler", negative=negative, clip_skip=clip_skip)[0]
    assert max_difference(ours, theirs) == 0
