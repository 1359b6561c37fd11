"""Inserting embeddings into diffusers pipeline folders, checked against diffusers'
`load_textual_inversion`: for every embedding format the prompt embeddings of our
written model equal those of the original model after diffusers loads the same file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from embedding_models import (FORMATS, PROMPT, a1111_pt, close, kohya_safetensors, load_sd1, load_sdxl,
                              quiet_peers, requests_for, sd1_pipeline, sd1_prompt_embeds, sdxl_pipeline)
from safetensors.torch import save_file

from sdkit.errors import SdkitError
from sdkit.ops.embed.add import add_embeddings

__all__ = ["quiet_peers", "sd1_pipeline", "sdxl_pipeline"]  # fixtures: imported to take effect here


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
