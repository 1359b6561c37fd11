"""`sdkit merge` on the command line: options, recipe files, replay, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge_support import checkpoint, invoke, run_main, write

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_inputs")
    return {name: write(folder / f"{name}.safetensors", checkpoint("sd1", seed))
            for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def test_merge_with_options_and_json_report(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    code, text = invoke(str(models["a"]), str(models["b"]), "--method", "weighted-sum",
                        "--alpha", "0", "--blocks", "IN04:1,MID:0.5", "--te-alpha", "1",
                        "--vae", "B", "--dtype", "fp32", "-o", str(out), "--json")
    assert code == 0
    report = json.loads(text)
    assert report["recipe"]["blocks"] == {"IN04": 1.0, "MID": 0.5}
    assert report["recipe"]["components"] == {"te": 1.0}
    assert report["report"]["components_taken"] == {"vae": "B"}
    merged, a, b = load_file(out), load_file(models["a"]), load_file(models["b"])
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    assert torch.equal(merged[text_key], b[text_key].float())
    assert torch.equal(merged[UNET + "input_blocks.1.0.in_layers.0.weight"],
                       a[UNET + "input_blocks.1.0.in_layers.0.weight"].float())
    assert torch.equal(merged["first_stage_model.decoder.conv_in.weight"],
                       b["first_stage_model.decoder.conv_in.weight"].float())


def test_recipe_file_then_replay(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {"inputs": [str(models["a"]), {"path": str(models["b"])}, str(models["c"])],
              "method": "ties", "params": {"k": 0.5}, "dtype": "fp16", "output": "from_recipe.safetensors"}
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    # the inputs lie in another folder and are too new for the hash cache: record their paths
    code, _ = invoke("--recipe", str(recipe_path), "-p", "alpha=0.75", options=("--record-paths",))
    assert code == 0
    out = tmp_path / "from_recipe.safetensors"  # relative to the recipe's folder
    with safe_open(str(out), "pt") as file:
        stored = json.loads(file.metadata()["sdkit.recipe"])
    assert (stored["method"], stored["params"]) == ("ties", {"alpha": 0.75, "k": 0.5})
    assert [item["path"] for item in stored["inputs"]] == [str(models[name]) for name in "abc"]
    code, text = invoke("--replay", str(out))
    assert code == 0 and "identical" in text
    tensors = load_file(out)
    tensors[UNET + "out.0.weight"] = tensors[UNET + "out.0.weight"] * 2
    with safe_open(str(out), "pt") as file:
        write(tmp_path / "edited.safetensors", tensors, file.metadata())
    code, text = invoke("--replay", str(tmp_path / "edited.safetensors"), "--json")
    assert code == 1 and json.loads(text)["different"] == [UNET + "out.0.weight"]


def test_errors_are_one_line(models: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    code, err = run_main(capsys, str(models["a"]), str(models["b"]), "-m", "blend", "-o", str(out))
    assert code == 1 and err.startswith("sdkit: error: unknown merge method 'blend'")
    assert len(err.strip().splitlines()) == 1
    out.write_bytes(b"keep me")
    code, err = run_main(capsys, str(models["a"]), str(models["b"]), "-o", str(out))
    assert code == 1 and "already exists" in err and out.read_bytes() == b"keep me"
    code, err = run_main(capsys, str(models["a"]), str(models["b"]), "-p", "k=1", "-o", str(tmp_path / "x.safetensors"))
    assert code == 1 and "has no parameter k" in err


@pytest.mark.parametrize("recipe", ["[" * 100_000 + "]" * 100_000, "[" + "[]," * 3_000_000 + "[]]", "{not json"])
def test_a_hostile_stored_recipe_is_refused_in_one_line(models: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], recipe: str) -> None:
    merged = write(tmp_path / "merged.safetensors", load_file(models["a"]), {"sdkit.recipe": recipe})
    code, err = run_main(capsys, "--replay", str(merged))
    assert code == 1 and err.startswith("sdkit: error:") and "sdkit.recipe metadata is not valid JSON" in err
    assert len(err.strip().splitlines()) == 1


def test_list_methods() -> None:
    code, text = invoke("--list-methods")
    assert code == 0
    for name in ("weighted_sum", "add_difference", "train_difference", "ties", "dare", "slerp",
                 "n_average", "copy"):
        assert name in text


def test_replay_with_output_writes_what_a_direct_merge_writes(models: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the same date in every file written
    merged = tmp_path / "merged.safetensors"
    options = ("--method", "add_difference", "--alpha", "0.4", "--dtype", "fp16")
    assert invoke(str(models["a"]), str(models["b"]), str(models["c"]), *options, "-o", str(merged))[0] == 0
    direct = tmp_path / "again.safetensors"  # the same merge, run by hand into another file
    assert invoke(str(models["a"]), str(models["b"]), str(models["c"]), *options, "-o", str(direct))[0] == 0
    replayed = tmp_path / "replayed.safetensors"
    code, text = invoke("--replay", str(merged), "-o", str(replayed))
    assert code == 0 and text.startswith("wrote")
    expected, ours = load_file(merged), load_file(replayed)
    assert sorted(ours) == sorted(expected)
    assert all(ours[k].dtype == expected[k].dtype and torch.equal(ours[k], expected[k]) for k in expected)
    with safe_open(str(direct), "pt") as file:
        by_hand = file.metadata()
    with safe_open(str(replayed), "pt") as file:
        written = file.metadata()
    title = "modelspec.title"  # the output's own name
    assert written.pop(title) == "replayed" and by_hand.pop(title) == "again"
    assert written == by_hand
    # an existing output is refused as by any merge; without -o the replay only checks
    code, err = run_main(capsys, "--replay", str(merged), "-o", str(replayed))
    assert code == 1 and "already exists" in err and load_file(replayed).keys() == expected.keys()
    before = sorted(tmp_path.iterdir())
    code, text = invoke("--replay", str(merged))
    assert code == 0 and "identical" in text and sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(("method", "count"), [("weighted_sum", 3), ("weighted_sum", 1), ("add_difference", 2),
                                               ("train_difference", 4), ("slerp", 3), ("ties", 1)])
def test_a_wrong_number_of_models_is_a_usage_error(models: dict[str, Path], tmp_path: Path, method: str,
                                                   count: int, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [str(models[name]) for name in "abc"] + [str(models["a"])]
    code, err = run_main(capsys, *inputs[:count], "-m", method, "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and f"merge method {method} takes" in err and f"got {count}" in err
    assert not (tmp_path / "m.safetensors").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": inputs[:count], "method": method}))
    code, err = run_main(capsys, "--recipe", str(recipe), "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and f"got {count}" in err
