"""Embeddings and single-file checkpoints: refused as a single-file output (no
single-file loader can use a grown token table or a tokenizer beside the file), written
as a diffusers pipeline folder with --to diffusers.

The folders are checked as their users load them: diffusers' `from_pretrained` of the
whole pipeline, against the original pipeline after `load_textual_inversion` of the same
file, and the bundled toy models through `CLIPTextModel` / `CLIPTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from embedding_models import (PROMPT, SD1_TOKEN_KEY, SDXL_TOKEN_KEYS, a1111_pt, close, kohya_safetensors,
                              load_sd1, load_sdxl, quiet_peers, requests_for, sd1_pipeline, sd1_prompt_embeds,
                              sdxl_pipeline)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdkit.errors import SdkitError
from sdkit.ops.embed.add import CheckpointSources, add_embeddings

__all__ = ["quiet_peers", "sd1_pipeline", "sdxl_pipeline"]  # fixtures: imported to take effect here

TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy"
# transformers saves CLIP text models with or without the `text_model.` prefix
DIFFUSERS_TOKEN_KEY = "embeddings.token_embedding.weight"
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def stored_table(path: Path, key: str) -> torch.Tensor:
    """A token table as its file stores it (dtype included), by its name or the end of it."""
    with safe_open(path, "pt") as file:
        name, = [name for name in file.keys() if name == key or name.endswith("." + key)]
        return file.get_tensor(name)


def single_file(pipeline: Path, path: Path) -> Path:
    """`pipeline` as an LDM single file (`.safetensors`, or a `.ckpt` holding a state_dict)."""
    from sdkit.ops.convert.model import ConvertOptions, convert_model

    converted = path.with_name(path.stem + ".converted.safetensors")
    convert_model(pipeline, converted, ConvertOptions(to="single-file"))
    if path.suffix == ".ckpt":
        torch.save({"state_dict": load_file(converted), "global_step": 10}, path)
    else:
        converted.rename(path)
    converted.unlink(missing_ok=True)
    return path


def text_encoder_file(pipeline: Path, path: Path, family: str) -> Path:
    """A single file holding only the text encoder token tables of `pipeline`, as SD1, SD2
    (OpenCLIP names) or SDXL checkpoints name them."""
    def table(component: str) -> torch.Tensor:
        return stored_table(pipeline / component / "model.safetensors", DIFFUSERS_TOKEN_KEY)

    if family == "sdxl":
        tensors = dict(zip(SDXL_TOKEN_KEYS, (table("text_encoder"), table("text_encoder_2"))))
    else:
        key = SD1_TOKEN_KEY if family == "sd1" else "cond_stage_model.model.token_embedding.weight"
        tensors = {key: table("text_encoder")}
    tensors["model.diffusion_model.out.2.weight"] = torch.randn(4, 8, 3, 3)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, path)
    return path


def sdxl_embedding(path: Path, count: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    vectors = {"clip_l": torch.randn(count, 32, generator=generator),
               "clip_g": torch.randn(count, 48, generator=generator)}
    save_file(vectors, path)
    return vectors


@pytest.mark.parametrize("shape", ["sd1.safetensors", "sd1.ckpt", "sd2.safetensors", "sdxl.safetensors"])
@pytest.mark.parametrize("output_name", ["out.safetensors", "out"])
def test_a_single_file_output_is_refused_and_nothing_written(sd1_pipeline: Path, sdxl_pipeline: Path,
                                                             tmp_path: Path, shape: str, output_name: str) -> None:
    family = shape.split(".")[0]
    source = text_encoder_file(sdxl_pipeline if family == "sdxl" else sd1_pipeline, tmp_path / f"model.{shape}",
                               family)
    emb = tmp_path / "mystyle.safetensors"
    if family == "sdxl":
        sdxl_embedding(emb, 1)
    else:
        kohya_safetensors(emb, torch.randn(1, 32))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SdkitError) as refused:
        add_embeddings(source, requests_for((emb, None)), tmp_path / output_name,
                       sources=CheckpointSources(tokenizer=sd1_pipeline / "tokenizer"))
    message = str(refused.value)
    for said in ("single-file checkpoint", "49408", "ComfyUI", "A1111", "embeddings folder",
                 "mystyle.safetensors", "embedding:mystyle", "--to diffusers"):
        assert said in message, (said, message)
    assert sorted(tmp_path.iterdir()) == before


def test_cli_refusal_is_one_line(sd1_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sdkit.cli.embed_cmd  # noqa: F401  (attaches the group)
    from sdkit.cli.main import main

    source = text_encoder_file(sd1_pipeline, tmp_path / "model.safetensors", "sd1")
    emb = tmp_path / "style.pt"
    a1111_pt(emb, torch.randn(1, 32))
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "add", str(source), str(emb), "-o", str(tmp_path / "out.safetensors")])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdkit: error: {source}: new tokens cannot go into")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_single_file_to_diffusers_matches_diffusers_loader(sd1_pipeline: Path, tmp_path: Path,
                                                                suffix: str) -> None:
    source = single_file(sd1_pipeline, tmp_path / f"model{suffix}")
    emb = tmp_path / "mystyle.pt"
    a1111_pt(emb, torch.randn(2, 32))
    output = tmp_path / "model-mystyle"
    result = add_embeddings(source, requests_for((emb, None)), output, to="diffusers",
                            sources=CheckpointSources(config_dir=sd1_pipeline))

    theirs = load_sd1(sd1_pipeline)
    theirs.load_textual_inversion(str(emb), token="mystyle")
    ours = load_sd1(output)
    table = ours.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, theirs.text_encoder.get_input_embeddings().weight)
    assert ours.text_encoder.config.vocab_size == table.shape[0] == result.rows["text_encoder"][1] == 521
    prompt = PROMPT.format("mystyle")
    assert ours.tokenizer(ours.maybe_convert_prompt(prompt, ours.tokenizer)).input_ids == \
        theirs.tokenizer(theirs.maybe_convert_prompt(prompt, theirs.tokenizer)).input_ids
    close(sd1_prompt_embeds(ours, "mystyle"), sd1_prompt_embeds(theirs, "mystyle"))
    expected_unet = theirs.unet.state_dict()
    assert all(torch.equal(value, expected_unet[key]) for key, value in ours.unet.state_dict().items())
    with safe_open(output / "text_encoder" / "model.safetensors", "pt") as file:
        assert json.loads(file.metadata()["sdkit.recipe"])["operation"] == "embed add"


def test_sdxl_single_file_to_diffusers_grows_both_encoders(sdxl_pipeline: Path, tmp_path: Path) -> None:
    source = single_file(sdxl_pipeline, tmp_path / "xl.safetensors")
    emb = tmp_path / "xlstyle.safetensors"
    vectors = sdxl_embedding(emb, 2)
    add_embeddings(source, requests_for((emb, None)), tmp_path / "out", to="diffusers",
                   sources=CheckpointSources(config_dir=sdxl_pipeline))
    theirs = load_sdxl(sdxl_pipeline)
    theirs.load_textual_inversion(vectors["clip_l"], token="xlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(vectors["clip_g"], token="xlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    ours = load_sdxl(tmp_path / "out")
    for encoder in ("text_encoder", "text_encoder_2"):
        assert torch.equal(getattr(ours, encoder).get_input_embeddings().weight,
                           getattr(theirs, encoder).get_input_embeddings().weight)
    with torch.no_grad():
        prompt = PROMPT.format("xlstyle")
        expected = theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        actual = ours.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    close(actual[0], expected[0])
    close(actual[2], expected[2])


def test_pipeline_options_are_refused_for_a_folder(sd1_pipeline: Path, tmp_path: Path) -> None:
    emb = tmp_path / "style.pt"
    a1111_pt(emb, torch.randn(1, 32))
    with pytest.raises(SdkitError, match="--config and --tokenizer are for a single-file model"):
        add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "out",
                       sources=CheckpointSources(tokenizer=sd1_pipeline))
    assert sorted(tmp_path.iterdir()) == [emb]


def test_single_file_without_tokenizer_asks_for_one(sd1_pipeline: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    source = single_file(sd1_pipeline, tmp_path / "model.safetensors")
    emb = tmp_path / "mystyle.pt"
    a1111_pt(emb, torch.randn(1, 32))
    with pytest.raises(SdkitError, match="--tokenizer"):
        add_embeddings(source, requests_for((emb, None)), tmp_path / "out", to="diffusers")
    assert sorted(tmp_path.iterdir()) == sorted([source, emb])


# --------------------------------------------------------------------------- the toy models

TOY_CASES = {  # case -> (family, model given to embed add, where each encoder's table was)
    "sd1 single file": ("sd1", TOY / "sd1" / "toy-sd1.safetensors",
                        {"text_encoder": (TOY / "sd1" / "toy-sd1.safetensors", SD1_TOKEN_KEY)}),
    "sdxl single file": ("sdxl", TOY / "sdxl" / "toy-sdxl.safetensors",
                         {component: (TOY / "sdxl" / "toy-sdxl.safetensors", key)
                          for component, key in zip(("text_encoder", "text_encoder_2"), SDXL_TOKEN_KEYS)}),
    "sdxl folder": ("sdxl", TOY / "sdxl" / "diffusers",
                    {component: (TOY / "sdxl" / "diffusers" / component / "model.safetensors", DIFFUSERS_TOKEN_KEY)
                     for component in ("text_encoder", "text_encoder_2")}),
}


@pytest.mark.parametrize("case", sorted(TOY_CASES))
def test_toy_model_folders_load_with_the_new_tokens(tmp_path: Path, case: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family, model, originals = TOY_CASES[case]
    emb = tmp_path / "toystyle.safetensors"
    if family == "sdxl":
        vectors = sdxl_embedding(emb, 2)
    else:
        vectors = {"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}
        kohya_safetensors(emb, vectors["clip_l"])
    single = model.is_file()
    add_embeddings(model, requests_for((emb, "<toy>")), tmp_path / "out", to="diffusers" if single else None,
                   sources=CheckpointSources(config_dir=TOY / family / "diffusers") if single else CheckpointSources())

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    assert pipeline_class.from_pretrained(tmp_path / "out") is not None
    for component, (file, key) in originals.items():
        encoder_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        encoder = encoder_class.from_pretrained(tmp_path / "out" / component)
        tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "out" / component.replace("text_encoder", "tokenizer"))
        ids = tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1"])
        assert tokenizer("<toy> <toy>_1").input_ids[1:-1] == ids and len(set(ids)) == 2
        original = stored_table(file, key)
        table = encoder.get_input_embeddings().weight
        assert encoder.config.vocab_size == table.shape[0] >= max(ids) + 1
        new_vectors = vectors["clip_g" if component == "text_encoder_2" else "clip_l"]
        assert torch.equal(table[ids], new_vectors.to(original.dtype).to(table.dtype))
        kept = [row for row in range(original.shape[0]) if row not in ids]
        assert torch.equal(table[kept], original[kept].to(table.dtype))
        # the layout ComfyUI's diffusers loader maps (it drops a text encoder without it)
        with safe_open(str(tmp_path / "out" / component / "model.safetensors"), "pt") as written:
            assert all(key.startswith("text_model.") or key == "text_projection.weight" for key in written.keys())
