"""Inserting embeddings into models, checked against diffusers' `load_textual_inversion`.

Tiny SD1 and SDXL-layout pipelines (CLIP text encoders of width 32 and 48) use a real
`CLIPTokenizer` written from a vocab.json + merges.txt, as the hub's SD repositories
ship them; the text encoders have as many rows as the tokenizer has tokens, like real
CLIP. For every embedding format the prompt embeddings of our written model equal those
of the original model after diffusers loads the same file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdkit.adapters.embedding import read_embedding
from sdkit.errors import SdkitError
from sdkit.ops.embed import EmbeddingRequest, add_embeddings, companion_folder

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


@pytest.fixture(scope="module")
def sd1_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    scratch = tmp_path_factory.mktemp("sd1-tokenizer")
    vocab = write_tokenizer(scratch / "tokenizer", "<|endoftext|>")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(text_config(vocab, 32)),
        tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"), unet=tiny_unet(32),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return save_with_hub_tokenizers(pipe, tmp_path_factory.mktemp("sd1") / "pipe",
                                    {"tokenizer": "<|endoftext|>"})


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    scratch = tmp_path_factory.mktemp("sdxl-tokenizer")
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
    return save_with_hub_tokenizers(pipe, tmp_path_factory.mktemp("sdxl") / "pipe",
                                    {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})


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


@pytest.mark.parametrize("layout,count", [("a1111", 1), ("a1111", 3), ("kohya", 2),
                                          ("diffusers-bin", 1), ("diffusers-safetensors", 2)])
def test_sd1_folder_matches_diffusers_loader(sd1_pipeline: Path, tmp_path: Path, layout: str,
                                             count: int) -> None:
    name, write = FORMATS[layout]
    path = tmp_path / name
    write(path, torch.randn(count, 32, generator=torch.Generator().manual_seed(count)))
    request = requests_for((path, None))[0]
    result = add_embeddings(sd1_pipeline, [request], tmp_path / "out")

    theirs = load_sd1(sd1_pipeline)
    # diffusers takes A1111's stored name and cannot name kohya's emb_params: pass ours
    theirs.load_textual_inversion(str(path), token=None if layout.startswith("diffusers") else request.token)
    ours = load_sd1(tmp_path / "out")
    assert request.token == ("<concept>" if layout.startswith("diffusers") else path.stem)
    converted = ours.maybe_convert_prompt(PROMPT.format(request.token), ours.tokenizer)
    assert ours.tokenizer(converted).input_ids == theirs.tokenizer(
        theirs.maybe_convert_prompt(PROMPT.format(request.token), theirs.tokenizer)).input_ids
    close(sd1_prompt_embeds(ours, request.token), sd1_prompt_embeds(theirs, request.token))
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight,
                       theirs.text_encoder.get_input_embeddings().weight)
    assert ours.text_encoder.config.vocab_size == result.rows["text_encoder"][1] == 519 + count


def test_two_embeddings_at_once_match_loading_them_in_turn(sd1_pipeline: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first.pt", tmp_path / "second.safetensors"
    a1111_pt(first, torch.randn(2, 32))
    kohya_safetensors(second, torch.randn(1, 32))
    add_embeddings(sd1_pipeline, requests_for((first, None), (second, "<second>")), tmp_path / "out")
    theirs = load_sd1(sd1_pipeline)
    theirs.load_textual_inversion(str(first), token="first")
    theirs.load_textual_inversion(str(second), token="<second>")
    ours = load_sd1(tmp_path / "out")
    prompt = "first and <second>"
    with torch.no_grad():
        close(ours.encode_prompt(prompt, "cpu", 1, False)[0],
              theirs.encode_prompt(prompt, "cpu", 1, False)[0])


def test_sdxl_folder_gets_both_encoders(sdxl_pipeline: Path, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    clip_l, clip_g = torch.randn(2, 32, generator=generator), torch.randn(2, 48, generator=generator)
    path = tmp_path / "xlstyle.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    add_embeddings(sdxl_pipeline, requests_for((path, None)), tmp_path / "out")

    theirs = load_sdxl(sdxl_pipeline)
    theirs.load_textual_inversion(clip_l, token="xlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(clip_g, token="xlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    ours = load_sdxl(tmp_path / "out")
    with torch.no_grad():
        prompt = PROMPT.format("xlstyle")
        expected = theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        actual = ours.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    close(actual[0], expected[0])  # prompt embeddings
    close(actual[2], expected[2])  # pooled embeddings
    for encoder in ("text_encoder", "text_encoder_2"):
        assert torch.equal(getattr(ours, encoder).get_input_embeddings().weight,
                           getattr(theirs, encoder).get_input_embeddings().weight)
    assert ours.tokenizer_2.pad_token == "!"


def ldm_checkpoint(pipeline: Path, path: Path, layout: str) -> dict[str, torch.Tensor]:
    """An LDM single file holding the pipeline's text encoder(s) under community names."""
    def read(component: str) -> dict[str, torch.Tensor]:
        with safe_open(pipeline / component / "model.safetensors", "pt") as file:
            return {key.removeprefix("text_model."): file.get_tensor(key) for key in file.keys()}

    if layout == "sd1":
        tensors = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in read("text_encoder").items()}
    else:
        tensors = {f"conditioner.embedders.0.transformer.text_model.{k}": v
                   for k, v in read("text_encoder").items()}
        tensors[SDXL_TOKEN_KEYS[1]] = read("text_encoder_2")["embeddings.token_embedding.weight"]
    tensors["model.diffusion_model.out.2.weight"] = torch.randn(4, 8, 3, 3).half()
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, "global_step": 10}, path)
    else:
        save_file(tensors, path, metadata={"modelspec.title": "tiny"})
    return tensors


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_single_file_grows_token_embedding_like_diffusers(sd1_pipeline: Path, tmp_path: Path,
                                                              suffix: str) -> None:
    source = tmp_path / f"model{suffix}"
    original = ldm_checkpoint(sd1_pipeline, source, "sd1")
    emb = tmp_path / "mystyle.pt"
    a1111_pt(emb, torch.randn(2, 32))
    output = tmp_path / "model-mystyle.safetensors"
    result = add_embeddings(source, requests_for((emb, None)), output, tokenizer_source=sd1_pipeline)

    theirs = load_sd1(sd1_pipeline)
    theirs.load_textual_inversion(str(emb), token="mystyle")
    with safe_open(output, "pt") as file:
        assert set(file.keys()) == set(original)
        assert torch.equal(file.get_tensor(SD1_TOKEN_KEY), theirs.text_encoder.get_input_embeddings().weight)
        for key in set(original) - {SD1_TOKEN_KEY}:
            assert torch.equal(file.get_tensor(key), original[key])
        metadata = file.metadata()
    assert json.loads(metadata["sdkit.recipe"])["operation"] == "embed add"
    assert (metadata.get("modelspec.title") == "tiny") == (suffix == ".safetensors")
    from transformers import CLIPTokenizer

    companion = CLIPTokenizer.from_pretrained(companion_folder(output), subfolder="tokenizer")
    assert result.tokenizer_folder == companion_folder(output)
    prompt = PROMPT.format("mystyle")
    assert companion(theirs.maybe_convert_prompt(prompt, companion)).input_ids == \
        theirs.tokenizer(theirs.maybe_convert_prompt(prompt, theirs.tokenizer)).input_ids


def test_sd2_openclip_layout_with_a_tokenizer_folder(sd1_pipeline: Path, tmp_path: Path) -> None:
    with safe_open(sd1_pipeline / "text_encoder" / "model.safetensors", "pt") as file:
        table = file.get_tensor("embeddings.token_embedding.weight")
    source = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": table,
               "cond_stage_model.model.positional_embedding": torch.randn(77, 32)}, source)
    emb = tmp_path / "sd2-emb.safetensors"
    kohya_safetensors(emb, torch.randn(3, 32))
    output = tmp_path / "sd2-style.safetensors"
    add_embeddings(source, requests_for((emb, "<sd2>")), output, tokenizer_source=sd1_pipeline / "tokenizer")
    theirs = load_sd1(sd1_pipeline)
    theirs.load_textual_inversion(str(emb), token="<sd2>")
    with safe_open(output, "pt") as file:
        assert torch.equal(file.get_tensor("cond_stage_model.model.token_embedding.weight"),
                           theirs.text_encoder.get_input_embeddings().weight)


def test_sdxl_single_file_grows_both_token_embeddings(sdxl_pipeline: Path, tmp_path: Path) -> None:
    source = tmp_path / "xl.safetensors"
    ldm_checkpoint(sdxl_pipeline, source, "sdxl")
    clip_l, clip_g = torch.randn(1, 32), torch.randn(1, 48)
    emb = tmp_path / "xlstyle.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, emb)
    output = tmp_path / "xl-style.safetensors"
    add_embeddings(source, requests_for((emb, None)), output, tokenizer_source=sdxl_pipeline)
    theirs = load_sdxl(sdxl_pipeline)
    theirs.load_textual_inversion(clip_l, token="xlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(clip_g, token="xlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    with safe_open(output, "pt") as file:
        for key, encoder in zip(SDXL_TOKEN_KEYS, (theirs.text_encoder, theirs.text_encoder_2)):
            assert torch.equal(file.get_tensor(key), encoder.get_input_embeddings().weight)
    assert sorted(p.name for p in companion_folder(output).iterdir()) == ["tokenizer", "tokenizer_2"]


def test_wrong_dimension_is_refused_and_nothing_written(sd1_pipeline: Path, tmp_path: Path) -> None:
    emb = tmp_path / "sd1-real.safetensors"
    kohya_safetensors(emb, torch.randn(1, 768))
    with pytest.raises(SdkitError, match=r"dimension 768 .* \(dimension 32\)"):
        add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [emb]


def test_sdxl_embedding_is_refused_by_an_sd1_model(sd1_pipeline: Path, tmp_path: Path) -> None:
    emb = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}, emb)
    with pytest.raises(SdkitError, match="text_encoder_2 48"):
        add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "out")


def test_token_in_vocabulary_needs_force(sd1_pipeline: Path, tmp_path: Path) -> None:
    emb = tmp_path / "pho.pt"
    vectors = torch.randn(1, 32)
    a1111_pt(emb, vectors)
    with pytest.raises(SdkitError, match="'pho' is already in the vocabulary"):
        add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "out")
    add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "out", force=True)
    ours = load_sd1(tmp_path / "out")
    row = ours.tokenizer.convert_tokens_to_ids("pho")
    assert row == json.loads((sd1_pipeline / "tokenizer" / "vocab.json").read_text())["pho"]
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[row], vectors[0])
    assert ours.text_encoder.config.vocab_size == 519


def test_added_token_cannot_be_added_twice(sd1_pipeline: Path, tmp_path: Path) -> None:
    emb = tmp_path / "twice.pt"
    a1111_pt(emb, torch.randn(2, 32))
    add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "once")
    with pytest.raises(SdkitError, match="'twice' is already in the vocabulary"):
        add_embeddings(tmp_path / "once", requests_for((emb, None)), tmp_path / "twice")
    with pytest.raises(SdkitError, match="already exists"):
        add_embeddings(sd1_pipeline, requests_for((emb, None)), tmp_path / "once")


def test_single_file_without_tokenizer_asks_for_one(sd1_pipeline: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    source = tmp_path / "model.safetensors"
    ldm_checkpoint(sd1_pipeline, source, "sd1")
    emb = tmp_path / "mystyle.pt"
    a1111_pt(emb, torch.randn(1, 32))
    with pytest.raises(SdkitError, match="--tokenizer"):
        add_embeddings(source, requests_for((emb, None)), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_add_reports_ids(sd1_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sdkit.cli.embed_cmd  # noqa: F401  (attaches the group)
    from sdkit.cli.main import main

    emb = tmp_path / "style.pt"
    a1111_pt(emb, torch.randn(2, 32))
    main(["embed", "add", str(sd1_pipeline), f"{emb}:<cli>", "-o", str(tmp_path / "out"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["ids"] == {"<cli>": {"text_encoder": [519, 520]}}
    assert report["rows"] == {"text_encoder": [519, 521]}
    tokenizer_folder = tmp_path / "out" / "tokenizer"
    added = json.loads((tokenizer_folder / "added_tokens.json").read_text())
    assert added == {"<cli>": 519, "<cli>_1": 520}
    # the files older tokenizers read (no tokenizer.json) give the same ids
    from transformers import CLIPTokenizer

    shutil.copytree(tokenizer_folder, tmp_path / "files-only")
    (tmp_path / "files-only" / "tokenizer.json").unlink()
    assert CLIPTokenizer.from_pretrained(tmp_path / "files-only")("<cli> <cli>_1").input_ids == \
        CLIPTokenizer.from_pretrained(tokenizer_folder)("<cli> <cli>_1").input_ids == [517, 519, 520, 518]
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "add", str(sd1_pipeline), f"{emb}:<cli>", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("sdkit: error: ")
