"""Merges in named steps: the written step equals running the steps one by one with each
result written (bit for bit), replay, and the recipes that are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge_support import checkpoint, invoke, run_main, write

from sdkit.ops.merge import (
    MergeRecipe,
    RecipeInput,
    load_recipe_file,
    merge_models,
    replay_merge,
)
from sdkit.ops.merge.recipe import StepInput

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "fixtures" / "toy"
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small random SD1-layout checkpoints: a–d in fp16, e–f in fp32, x an SDXL one."""
    folder = tmp_path_factory.mktemp("step_inputs")
    made = {name: write(folder / f"{name}.safetensors", checkpoint("sd1", seed))
            for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4))}
    made |= {name: write(folder / f"{name}.safetensors", checkpoint("sd1", seed, torch.float32))
             for name, seed in (("e", 5), ("f", 6))}
    made["x"] = write(folder / "x.safetensors", checkpoint("sdxl", 7))
    return made


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # the steps in the order written
    return path


def step_by_step(recipe_file: Path, folder: Path) -> Path:
    """The oracle: each step run as a one-step merge, its result written and read back
    by the steps after it."""
    recipe = load_recipe_file(recipe_file)
    written: dict[str, Path] = {}
    for name, step in recipe.steps.items():
        inputs = [RecipeInput(str(written[item.step])) if isinstance(item, StepInput) else item
                  for item in step.inputs]
        plain = MergeRecipe(inputs, step.method, params=step.params, blocks=step.blocks,
                            components=step.components, take=step.take, dtype=step.dtype,
                            allow_nan=step.allow_nan)
        written[name] = merge_models(plain, folder / f"{name}.safetensors").path
    return written[recipe.final]


def data_bytes(path: Path) -> bytes:
    """The tensor bytes of a safetensors file (everything after its header)."""
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def assert_same_tensors(produced: Path, expected: Path) -> None:
    ours, theirs = load_file(produced), load_file(expected)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key].reshape(-1).view(torch.uint8), theirs[key].reshape(-1).view(torch.uint8)), key
    assert data_bytes(produced) == data_bytes(expected)


def paths(models: dict[str, Path], *names: str) -> list[str]:
    return [str(models[name]) for name in names]


CHAINS = {
    # the README's example: add difference, a block-weighted sum of it, TIES over it in fp16
    "documented": lambda m: {"steps": {
        "style": {"method": "add_difference", "inputs": paths(m, "a", "b", "c"), "params": {"alpha": 0.5}},
        "mix": {"method": "weighted_sum", "inputs": ["style", str(m["d"])], "params": {"alpha": 0.3},
                "blocks": "GRAD_V"},
        "final": {"method": "ties", "inputs": [str(m["a"]), "mix", str(m["c"])], "params": {"k": 0.3},
                  "dtype": "fp16"}}},
    # an fp16 step feeding an fp32 one (the rounding happens at the step), bf16 at the end
    "fp16 then fp32": lambda m: {"steps": {
        "half": {"method": "weighted_sum", "inputs": paths(m, "e", "f"), "params": {"alpha": 0.4}, "dtype": "fp16",
                 "blocks": "GRAD_V"},
        "full": {"method": "add_difference", "inputs": [{"step": "half"}, str(m["f"]), str(m["e"])],
                 "params": {"alpha": 0.7}, "dtype": "fp32", "take": {"vae": "merge"}},
        "last": {"method": "train_difference", "inputs": ["full", str(m["e"]), "half"], "dtype": "bf16"}}},
    # whole-tensor statistics fed by whole-tensor statistics: TIES of TIES, SLERP of both
    # (the first step's output read by two later steps)
    "streamed into streamed": lambda m: {"steps": {
        "t1": {"method": "ties", "inputs": paths(m, "a", "b", "c"), "params": {"k": 0.5}, "dtype": "fp16"},
        "t2": {"method": "ties", "inputs": [str(m["a"]), "t1", str(m["d"])], "params": {"k": 0.2, "alpha": 0.8},
               "components": {"te": 0.5}},
        "round": {"method": "slerp", "inputs": ["t2", "t1"], "params": {"alpha": 0.35}, "take": {"vae": "B"},
                  "dtype": "fp32"}},
        "output": "round"},
    "ties into dare": lambda m: {"steps": {
        "t1": {"method": "ties", "inputs": paths(m, "a", "b", "c"), "params": {"k": 0.5}, "dtype": "fp16"},
        "t2": {"method": "ties", "inputs": [str(m["a"]), "t1", str(m["d"])], "params": {"k": 0.2}},
        "drop": {"method": "dare", "inputs": ["t2", str(m["b"])], "params": {"p": 0.5, "seed": 3}}}},
    # copies, average and component sources through steps
    "components": lambda m: {"steps": {
        "avg": {"method": "n_average", "inputs": paths(m, "a", "b", "c", "d")},
        "te_from_b": {"method": "copy", "inputs": ["avg", str(m["b"])], "params": {"source": "A"},
                      "take": {"text_encoder": "B"}},
        "blend": {"method": "weighted_sum", "inputs": ["te_from_b", "avg"], "params": {"alpha": 0.25},
                  "components": {"unet": 0.9}, "blocks": {"IN04": 0.0, "OUT11": 1.0}, "dtype": "bf16"}}},
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_steps_equal_step_by_step_with_intermediates_written(models: dict[str, Path], tmp_path: Path,
                                                             chain: str) -> None:
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS[chain](models))
    (tmp_path / "by_step").mkdir()
    expected = step_by_step(recipe_file, tmp_path / "by_step")
    result = merge_models(load_recipe_file(recipe_file), tmp_path / "chain.safetensors")
    assert_same_tensors(result.path, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_step", "chain.safetensors", "r.yaml"]


@pytest.mark.parametrize("chain", ["documented", "ties into dare"])
def test_large_tensors_streamed_through_steps_in_pieces(models: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, chain: str) -> None:
    """Every tensor made a slice at a time through every step, with slices of sizes that
    do not divide each other (pieces of one step are cut again for the next)."""
    from sdkit.ops.merge import compute, streamed

    monkeypatch.setattr(compute, "PIECEWISE_BYTES", 0)
    monkeypatch.setattr(compute, "SLICE_ELEMENTS", 1000)
    monkeypatch.setattr(streamed, "PASS_SLICE", 768)
    monkeypatch.setattr(streamed, "REDUCE_SLICE", 2500)
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS[chain](models))
    (tmp_path / "by_step").mkdir()
    expected = step_by_step(recipe_file, tmp_path / "by_step")
    result = merge_models(load_recipe_file(recipe_file), tmp_path / "chain.safetensors")
    assert_same_tensors(result.path, expected)


def test_an_fp16_step_rounds_before_the_next(models: dict[str, Path], tmp_path: Path) -> None:
    """Against the formulas, computed here: the first step's result is rounded to fp16
    before the second step adds to it in float32."""
    recipe_file = write_recipe(tmp_path / "r.yaml", {"steps": {
        "half": {"method": "weighted_sum", "inputs": paths(models, "e", "f"), "params": {"alpha": 1.0},
                 "dtype": "fp16", "take": {"vae": "merge"}},
        "sum": {"method": "add_difference", "inputs": ["half", str(models["e"]), str(models["f"])],
                "params": {"alpha": 1.0}, "take": {"vae": "merge"}}}})
    out = load_file(merge_models(load_recipe_file(recipe_file), tmp_path / "out.safetensors").path)
    e, f = load_file(models["e"]), load_file(models["f"])
    key = UNET + "input_blocks.1.1.proj_in.weight"
    half = f[key].half().float()  # alpha 1: exactly B, then rounded at the step
    assert out[key].dtype == torch.float16  # the second step keeps its A's dtype
    assert torch.equal(out[key], (half + (e[key] - f[key])).half())
    assert not torch.equal(half, f[key])  # the rounding is really there


def test_toy_models_in_steps(tmp_path: Path) -> None:
    sd1, sd1_b = TOY / "sd1" / "toy-sd1.safetensors", TOY / "sd1-b" / "toy-sd1-b.safetensors"
    folder = TOY / "sd1" / "diffusers"
    recipe_file = write_recipe(tmp_path / "r.yaml", {"steps": {
        "diff": {"method": "add_difference", "inputs": [str(sd1_b), str(sd1), str(folder)], "params": {"alpha": 0.5}},
        "mix": {"method": "slerp", "inputs": [str(sd1), "diff"], "params": {"alpha": 0.6}, "dtype": "fp32"},
        "final": {"method": "dare", "inputs": [str(sd1_b), "mix", "diff"], "params": {"p": 0.3, "ties": True},
                  "blocks": {"IN01": 0.2, "OUT02": 0.9}, "dtype": "fp16"}}})
    (tmp_path / "by_step").mkdir()
    expected = step_by_step(recipe_file, tmp_path / "by_step")
    result = merge_models(load_recipe_file(recipe_file), tmp_path / "chain.safetensors")
    assert_same_tensors(result.path, expected)


def test_each_input_file_is_opened_once(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sdkit.io

    opened: list[str] = []
    real = sdkit.io.open_model

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sdkit.io, "open_model", counting)
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS["documented"](models))
    merge_models(load_recipe_file(recipe_file), tmp_path / "chain.safetensors")
    assert sorted(opened) == ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]


def test_replay_of_steps(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS["fp16 then fp32"](models))
    code, _ = invoke("--recipe", str(recipe_file), "-o", str(tmp_path / "out.safetensors"),
                     options=("--record-paths",))
    assert code == 0
    out = tmp_path / "out.safetensors"
    with safe_open(str(out), "pt") as file:
        stored = json.loads(file.metadata()["sdkit.recipe"])
    from sdkit import __version__
    from sdkit.io import hash_file

    assert stored["sdkit_version"] == __version__ and stored["output"] == "last"
    assert sorted(stored["steps"]) == ["full", "half", "last"]
    assert stored["steps"]["full"]["inputs"][0] == {"step": "half"}
    assert stored["steps"]["last"]["inputs"][2] == {"step": "half"}
    assert stored["steps"]["last"]["params"] == {"alpha": 1.0}  # the default, recorded
    assert isinstance(stored["steps"]["half"]["blocks"], list)  # the preset's values, not its name
    for step in stored["steps"].values():
        for item in step["inputs"]:
            if "path" in item:
                assert item["sha256"] == hash_file(item["path"]).sha256
    code, text = invoke("--replay", str(out))
    assert code == 0 and "identical" in text
    again = tmp_path / "again.safetensors"
    code, _ = invoke("--replay", str(out), "-o", str(again))
    assert code == 0 and data_bytes(again) == data_bytes(out)
    tensors = load_file(out)
    tensors[UNET + "out.0.weight"] = -tensors[UNET + "out.0.weight"]
    with safe_open(str(out), "pt") as file:
        edited = write(tmp_path / "edited.safetensors", tensors, file.metadata())
    result = replay_merge(edited)
    assert not result.identical and result.different == [UNET + "out.0.weight"]


def test_replay_refuses_a_changed_input(models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    local = {name: write(tmp_path / f"{name}.safetensors", load_file(models[name])) for name in "ef"}
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS["fp16 then fp32"](local))
    merged = merge_models(load_recipe_file(recipe_file), tmp_path / "out.safetensors").path
    changed = load_file(local["f"])
    changed[UNET + "out.0.bias"] = changed[UNET + "out.0.bias"] + 1
    write(local["f"], changed)
    code, err = run_main(capsys, "--replay", str(merged))
    assert code == 1 and "f.safetensors: sha256 is" in err and len(err.strip().splitlines()) == 1


def test_the_step_order_is_printed_and_dry_run_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = CHAINS["documented"](models)
    recipe["steps"] = dict(reversed(list(recipe["steps"].items())))  # written last step first
    recipe["output"] = "final"
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "out.safetensors"
    code, text = invoke("--recipe", str(recipe_file), "-o", str(out), "--dry-run")
    assert code == 0 and not out.exists()
    assert "steps: style → mix → final" in text
    assert "final: ties of a.safetensors, mix, c.safetensors" in text
    code, text = invoke("--recipe", str(recipe_file), "-o", str(out))
    assert code == 0 and out.exists() and "steps: style → mix → final" in text


def bad(models: dict[str, Path]) -> dict[str, tuple[dict[str, Any], str]]:
    a, b, c, x = paths(models, "a", "b", "c", "x")
    ws = "weighted_sum"
    return {
        "cycle": ({"steps": {"p": {"method": ws, "inputs": [a, "q"]}, "q": {"method": ws, "inputs": ["p", b]},
                             "r": {"method": ws, "inputs": ["q", c]}}}, "steps form a cycle: p → q → p"),
        "itself": ({"steps": {"p": {"method": ws, "inputs": ["p", b]}}}, "step p reads its own output"),
        "unknown input": ({"steps": {"p": {"method": ws, "inputs": [a, b]}, "q": {"method": ws, "inputs": ["pp", c]}}},
                          "step q: input 'pp' is neither a step nor a file (steps: p, q)"),
        "unknown {step}": ({"steps": {"p": {"method": ws, "inputs": [a, b]},
                                      "q": {"method": ws, "inputs": [{"step": "z"}, c]}}}, "no step named 'z'"),
        "unknown output": ({"steps": {"p": {"method": ws, "inputs": [a, b]}}, "output": "pp"},
                           "output 'pp' is not a step (steps: p)"),
        "unused": ({"steps": {"p": {"method": ws, "inputs": [a, b]}, "q": {"method": ws, "inputs": [a, c]}}},
                   "step p is not used by the output step q"),
        "families": ({"steps": {"p": {"method": ws, "inputs": [a, b]}, "q": {"method": ws, "inputs": [x, "p"]}}},
                     "step q: step p: is sd1, but A"),
        "arity": ({"steps": {"p": {"method": "add_difference", "inputs": [a, b]}, "q": {"method": ws, "inputs": ["p", c]}}},
                  "step p: merge method add_difference takes 3 models, got 2"),
        "step field": ({"steps": {"p": {"method": ws, "inputs": [a, b], "output": "o.safetensors"}}},
                       "step p: unknown recipe field 'output'"),
        "top field": ({"steps": {"p": {"method": ws, "inputs": [a, b]}}, "method": ws}, "unknown recipe field 'method'"),
        "name": ({"steps": {"p.q": {"method": ws, "inputs": [a, b]}}}, "step name 'p.q' must be"),
        "no steps": ({"steps": {}}, "steps must be a mapping"),
        "nan": ({"steps": {"p": {"method": "add_difference", "inputs": [a, b, c], "params": {"alpha": 1e30}},
                           "q": {"method": ws, "inputs": ["p", c]}}}, "step p: merged tensor"),
    }


@pytest.mark.parametrize("case", list(bad({name: Path(f"{name}.safetensors") for name in "abcdx"})))
def test_bad_recipes_are_refused_in_one_line(models: dict[str, Path], tmp_path: Path, case: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    recipe, message = bad(models)[case]
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "out.safetensors"
    code, err = run_main(capsys, "--recipe", str(recipe_file), "-o", str(out))
    assert code == 1 and err.startswith("sdkit: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_per_step_options_on_the_command_line_are_a_usage_error(models: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    recipe_file = write_recipe(tmp_path / "r.yaml", CHAINS["documented"](models))
    code, err = run_main(capsys, "--recipe", str(recipe_file), "--alpha", "0.2", "-o", str(tmp_path / "o.safetensors"))
    assert code == 2 and "each step" in err
