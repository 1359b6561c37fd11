"""A1111 prompt tags and adapters found by name in WebUI library folders."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from runtime_models import TEXT_WIDTH, draw, kohya_lora_tensors, max_difference, write_adapter
from sdkit.adapters.hypernet import HypernetworkSettings, new_hypernetwork, save_hypernetwork
from sdkit.errors import SdkitError
from sdkit.runtime.pipeline import load_model
from sdkit.runtime.sample.plan import AdapterArgs, parse_embedding_arg
from sdkit.runtime.sample.library import Library, kind_folders, resolve_file
from sdkit.runtime.sample.prompt import extract_networks, mentions, replace_name


def test_tags_are_parsed_and_taken_out_of_the_text():
    text, tags = extract_networks("a <lora:style:0.8> photo, <lyco:sub/x:0.5:0.25>  of <hypernet:hn:1.5> <foo:bar>")
    assert text == "a photo, of <foo:bar>"
    assert [(t.kind, t.name, t.te_strength, t.unet_strength) for t in tags] == [
        ("lora", "style", 0.8, 0.8), ("lora", "sub/x", 0.5, 0.25), ("hypernet", "hn", 1.5, 1.5)]
    assert extract_networks("<lora:a>")[1][0].te_strength == 1.0
    named = extract_networks("<lora:a:te=0.3:unet=0.6>")[1][0]
    assert (named.te_strength, named.unet_strength) == (0.3, 0.6)
    with pytest.raises(SdkitError, match="not a number"):
        extract_networks("<lora:a:lots>")


def test_embedding_names_match_whole_words_only():
    assert mentions("a MyStyle photo", "mystyle") and mentions("embedding:mystyle, x", "mystyle")
    assert not mentions("a mystyles photo", "mystyle") and not mentions("my-mystyle", "mystyle")
    assert replace_name("mystyle, embedding:mystyle x", "mystyle", "<t>") == "<t>, <t> x"


def test_embedding_argument_splits_a_token_but_keeps_existing_paths(tmp_path):
    assert parse_embedding_arg("a/b.pt:tok") == ("a/b.pt", "tok")
    assert parse_embedding_arg("a/b.pt") == ("a/b.pt", None)
    odd = tmp_path / "x:y.pt"
    odd.write_bytes(b"")
    assert parse_embedding_arg(str(odd)) == (str(odd), None)


@pytest.mark.parametrize("layout", ["a1111", "comfyui"])
def test_library_finds_files_by_stem_and_subpath(tmp_path, layout):
    folder = "models/Lora" if layout == "a1111" else "models/loras"
    target = tmp_path / folder / "sdxl" / "style.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    library = Library(tmp_path)
    assert library.find("lora", "style") == target == library.find("lora", "sdxl/style")
    assert library.find("lora", "other") is None
    assert resolve_file("style", "lora", library) == target
    with pytest.raises(SdkitError, match="no lora named 'other'"):
        resolve_file("other", "lora", library)
    assert "models/LyCORIS" in kind_folders("lora") and "embeddings" in kind_folders("embedding")


def test_a_prompt_tag_nothing_answers_is_left_out_with_a_reason_as_a1111_does():
    from sdkit.runtime.sample.plan import Adapters, plan_prompt

    plan = plan_prompt("a <lora:style:1> photo", Adapters(), None)
    assert plan.loras == () and plan.text.split() == ["a", "photo"]
    (reason,) = plan.missing
    assert "prompt tag <lora:style:1>" in reason and "--library" in reason and "as A1111 does" in reason


def test_sample_draws_without_a_missing_prompt_lora_and_warns(sd1, tmp_path, capsys):
    from cli_run import run_sdkit

    code, _out, err = run_sdkit(capsys, "sample", str(sd1.file), "-p", "a red circle <lora:nowhere:0.8>",
                                "--steps", "2", "--width", "32", "--height", "32", "-o", str(tmp_path / "a.png"))
    assert code == 0, err
    assert "warning: prompt tag <lora:nowhere:0.8>" in err and (tmp_path / "a.png").exists()


def _webui(tmp_path, sd1):
    root = tmp_path / "webui"
    pipe = load_model(sd1.folder).pipe
    lora = root / "models" / "Lora" / "style.safetensors"
    lora.parent.mkdir(parents=True)
    write_adapter(lora, kohya_lora_tensors(pipe, seed=11))
    shutil.copyfile(lora, tmp_path / "copy.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, TEXT_WIDTH, generator=torch.Generator().manual_seed(1))},
              str(root / "embeddings" / "mystyle.safetensors"))
    hypernet = root / "models" / "hypernetworks" / "hn.pt"
    hypernet.parent.mkdir(parents=True)
    save_hypernetwork(hypernet, new_hypernetwork("hn", (TEXT_WIDTH, 64), HypernetworkSettings(
        weight_init="XavierNormal"), generator=torch.Generator().manual_seed(2)))
    return Library(root)


def test_prompt_tags_resolved_in_the_library_equal_the_same_files_given_directly(sd1, tmp_path):
    library = _webui(tmp_path, sd1)
    model = load_model(sd1.file)
    by_tags = draw(model, "a <lora:style:0.6> mystyle photo <hypernet:hn:0.5>", library=library)[0]
    root = library.root
    direct = draw(model, "a mystyle photo", adapters=AdapterArgs(
        loras=[f"{tmp_path / 'copy.safetensors'}:0.6"],
        embeddings=[str(root / "embeddings" / "mystyle.safetensors")],
        hypernets=[f"{root / 'models' / 'hypernetworks' / 'hn.pt'}:0.5"]))[0]
    assert max_difference(by_tags, direct) == 0
    assert max_difference(by_tags, draw(model, "a mystyle photo")[0]) > 10


def test_names_from_the_library_also_work_for_arguments(sd1, tmp_path):
    library = _webui(tmp_path, sd1)
    model = load_model(sd1.file)
    assert max_difference(draw(model, "a photo", library=library, adapters=AdapterArgs(loras=["style:0.6"]))[0],
                          draw(model, "a <lora:style:0.6> photo", library=library)[0]) == 0
