"""Merging tiny SD1/SDXL-layout checkpoints written to disk, end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdkit.arch.blocks import block_layout, component_of
from sdkit.errors import SdkitError
from sdkit.io import hash_file
from sdkit.ops.merge import MergeRecipe, RecipeInput, merge_models, replay_merge
from sdkit.io.ahead import Prefetcher, single_threaded_torch
from test_merge_support import checkpoint, write, write_diffusers_folder

VAE = "first_stage_model."
UNET = "model.diffusion_model."


def recipe(paths: list[Path], method: str = "weighted_sum", **fields: object) -> MergeRecipe:
    return MergeRecipe([RecipeInput(str(p)) for p in paths], method, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    return {name: write(folder / f"{name}.safetensors", checkpoint("sd1", seed))
            for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def test_weighted_sum_ends_reproduce_the_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    a, b = load_file(models["a"]), load_file(models["b"])
    progress: list[int] = []
    zero = merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.0}),
                        tmp_path / "zero.safetensors", progress=progress.append)
    out = load_file(zero.path)
    assert out.keys() == a.keys() and all(torch.equal(out[k], a[k]) for k in a)
    assert len(progress) == len(a) and sum(progress) == zero.output_bytes
    result = merge_models(recipe([models["a"], models["b"]], params={"alpha": 1.0}),
                          tmp_path / "one.safetensors")
    out = load_file(result.path)
    # the VAE is carried from A unless asked; everything else is B
    assert all(torch.equal(out[k], a[k] if k.startswith(VAE) else b[k]) for k in a)
    assert result.report.components_taken == {"vae": "A"}
    out = load_file(merge_models(recipe([models["a"], models["b"]], params={"alpha": 1.0},
                                        take={"vae": "merge"}), tmp_path / "all.safetensors").path)
    assert all(torch.equal(out[k], b[k]) for k in b)


def test_weighted_sum_matches_the_formula_in_input_dtype(models: dict[str, Path], tmp_path: Path) -> None:
    a, b = load_file(models["a"]), load_file(models["b"])
    out = load_file(merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.3}),
                                 tmp_path / "ws.safetensors").path)
    key = UNET + "input_blocks.1.1.proj_in.weight"
    expected = (0.7 * a[key].float() + 0.3 * b[key].float()).half()
    assert out[key].dtype == torch.float16
    assert torch.allclose(out[key].float(), expected.float(), atol=1e-3)  # fp16 rounding


def test_add_difference_of_b_minus_a_gives_b(tmp_path: Path) -> None:
    a = write(tmp_path / "a32.safetensors", checkpoint("sd1", 1, torch.float32))
    b = write(tmp_path / "b32.safetensors", checkpoint("sd1", 2, torch.float32))
    out = load_file(merge_models(recipe([a, b, a], "add_difference", params={"alpha": 1.0},
                                        take={"vae": "merge"}), tmp_path / "ad.safetensors").path)
    expected = load_file(b)
    # A + (B − A) in float32: within 2 ulp of |A| + |B| (values here are below 1)
    for key, value in expected.items():
        assert (out[key].double() - value.double()).abs().max() <= 2.4e-7, key


@pytest.mark.parametrize("method,params", [("ties", {"k": 0.3}), ("dare", {"p": 0.5, "seed": 3})])
def test_random_and_ranked_methods_are_deterministic_across_threads(
        models: dict[str, Path], tmp_path: Path, method: str, params: dict[str, object],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the same ModelSpec date in both files
    inputs = [models["a"], models["b"], models["c"]]
    paths = [tmp_path / name / "m.safetensors" for name in ("one", "three", "other")]
    for path in paths:
        path.parent.mkdir()
    first = merge_models(recipe(inputs, method, params=params), paths[0], threads=1)
    again = merge_models(recipe(inputs, method, params=params), paths[1], threads=3)
    assert sha256(first.path) == sha256(again.path)
    changed = {**params, "seed": 4} if method == "dare" else {**params, "k": 0.6}
    other = merge_models(recipe(inputs, method, params=changed), paths[2])
    theirs, ours = load_file(other.path), load_file(first.path)
    assert any(not torch.equal(theirs[k], ours[k]) for k in ours)  # the parameter matters


def test_block_weights_touch_exactly_their_blocks(models: dict[str, Path], tmp_path: Path) -> None:
    a = load_file(models["a"])
    result = merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.0},
                                 blocks={"IN04": 0.5, "OUT11": 1.0}), tmp_path / "mbw.safetensors")
    out = load_file(result.path)
    layout = block_layout(a)
    changed = {k for k in a if not torch.equal(out[k], a[k])}
    assert changed == {k for k in a if layout.block_of(k) in ("IN04", "OUT11")}
    assert UNET + "out.2.weight" in changed  # the final output layers belong to OUT11


def test_block_list_and_component_weights(models: dict[str, Path], tmp_path: Path) -> None:
    a, b = load_file(models["a"]), load_file(models["b"])
    values = [0.0] * 26
    values[0] = 1.0  # BASE: the text encoder and time_embed
    result = merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.0}, blocks=values,
                                 components={"unet": 1.0}), tmp_path / "list.safetensors")
    out = load_file(result.path)
    text = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(out[text], b[text])  # BASE = 1 reaches the text encoder
    assert torch.equal(out[UNET + "time_embed.0.weight"], b[UNET + "time_embed.0.weight"])
    # a block weight beats the unet component weight
    assert torch.equal(out[UNET + "input_blocks.1.1.proj_in.weight"], a[UNET + "input_blocks.1.1.proj_in.weight"])
    out = load_file(merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.0}, blocks=values,
                                        components={"te": 0.0, "unet": 1.0}),
                                 tmp_path / "te.safetensors").path)
    assert torch.equal(out[text], a[text])  # a text-encoder weight beats BASE
    with pytest.raises(SdkitError, match="has 26 blocks"):
        merge_models(recipe([models["a"], models["b"]], blocks=[0.5] * 20), tmp_path / "x.safetensors")
    with pytest.raises(SdkitError, match="no block 'IN12'"):
        merge_models(recipe([models["a"], models["b"]], blocks={"IN12": 1}), tmp_path / "x.safetensors")


def test_take_components_from_named_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    a, b, c = (load_file(models[n]) for n in "abc")
    out = load_file(merge_models(recipe([models["a"], models["b"], models["c"]], "copy",
                                        take={"text_encoder": "B", "vae": "C"}),
                                 tmp_path / "parts.safetensors").path)
    for key in a:
        source = {"text_encoder": b, "vae": c}.get(component_of(key), a)
        assert torch.equal(out[key], source[key]), key


def test_replay_reproduces_bit_for_bit_and_notices_changes(models: dict[str, Path], tmp_path: Path) -> None:
    made = merge_models(recipe([models["a"], models["b"], models["c"]], "dare",
                               params={"p": 0.3, "seed": 9}, blocks={"M00": 0.5}),
                        tmp_path / "merged.safetensors")
    stored = json.loads(metadata(made.path)["sdkit.recipe"])
    assert [i["sha256"] for i in stored["inputs"]] == [sha256(models[n]) for n in "abc"]
    assert stored["params"] == {"alpha": 1.0, "p": 0.3, "seed": 9, "ties": False}
    replay = replay_merge(made.path, threads=2)
    assert replay.identical and replay.matched == len(load_file(made.path))
    # a file whose tensors differ from what its recipe makes is reported, key by key
    tensors = load_file(made.path)
    key = UNET + "middle_block.1.proj_out.weight"
    tensors[key] = tensors[key] + 1
    tampered = write(tmp_path / "tampered.safetensors", tensors, metadata(made.path))
    assert replay_merge(tampered).different == [key]


def test_replay_refuses_a_changed_input(tmp_path: Path) -> None:
    a = write(tmp_path / "a.safetensors", checkpoint("sd1", 1))
    b = write(tmp_path / "b.safetensors", checkpoint("sd1", 2))
    made = merge_models(recipe([a, b]), tmp_path / "m.safetensors")
    write(b, checkpoint("sd1", 5))
    with pytest.raises(SdkitError, match="sha256"):
        replay_merge(made.path)


def test_provenance_metadata(models: dict[str, Path], tmp_path: Path) -> None:
    made = merge_models(recipe([models["a"], models["b"]], params={"alpha": 0.25}),
                        tmp_path / "My Merge.safetensors")
    meta = metadata(made.path)
    webui = json.loads(meta["sd_merge_recipe"])
    assert webui["primary_model_hash"] == sha256(models["a"])
    assert webui["secondary_model_hash"] == sha256(models["b"])
    assert (webui["interp_method"], webui["multiplier"]) == ("weighted_sum", 0.25)
    merged_models = json.loads(meta["sd_merge_models"])
    assert merged_models[sha256(models["b"])]["name"] == "b.safetensors"
    assert merged_models[sha256(models["b"])]["legacy_hash"] == hash_file(models["b"]).legacy
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "My Merge"
    assert meta["modelspec.merged_from"] == "a, b"
    # a merge of merges carries its inputs' own provenance along
    again = merge_models(recipe([made.path, models["c"]]), tmp_path / "again.safetensors")
    chain = json.loads(metadata(again.path)["sd_merge_models"])
    assert {sha256(models["a"]), sha256(models["b"]), sha256(models["c"]), sha256(made.path)} <= chain.keys()
    assert chain[sha256(made.path)]["sd_merge_recipe"]["interp_method"] == "weighted_sum"


def test_nan_stops_the_merge_and_leaves_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    broken = checkpoint("sd1", 2)
    key = UNET + "output_blocks.4.1.proj_in.weight"
    broken[key][0, 0] = float("nan")
    b = write(tmp_path / "nan.safetensors", broken)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SdkitError, match=key.replace(".", r"\.")):
        merge_models(recipe([models["a"], b]), out_dir / "m.safetensors")
    assert list(out_dir.iterdir()) == []
    kept = merge_models(recipe([models["a"], b], allow_nan=True), out_dir / "m.safetensors")
    assert kept.non_finite == {key: 1}
    assert torch.isnan(load_file(kept.path)[key]).sum() == 1


def test_missing_and_extra_keys_follow_the_rule(models: dict[str, Path], tmp_path: Path) -> None:
    a = load_file(models["a"])
    partial = checkpoint("sd1", 2)
    gone = UNET + "input_blocks.2.1.norm.weight"
    del partial[gone]
    partial["model.diffusion_model.extra_only_in_b"] = torch.ones(3, dtype=torch.float16)
    b = write(tmp_path / "partial.safetensors", partial)
    result = merge_models(recipe([models["a"], b], params={"alpha": 0.5}), tmp_path / "m.safetensors")
    out = load_file(result.path)
    assert torch.equal(out[gone], a[gone])  # taken from A
    assert torch.equal(out["model.diffusion_model.extra_only_in_b"], torch.ones(3, dtype=torch.float16))
    assert result.report.missing == {"B": [gone]}
    assert result.report.only_in == {"B": ["model.diffusion_model.extra_only_in_b"]}


def test_refusals_before_any_byte_is_written(models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    xl = write(tmp_path / "xl.safetensors", checkpoint("sdxl", 1))
    with pytest.raises(SdkitError, match="sdxl-base.*sd1"):
        merge_models(recipe([models["a"], xl]), tmp_path / "m.safetensors")
    reshaped = checkpoint("sd1", 2)
    key = UNET + "input_blocks.1.1.proj_in.weight"
    reshaped[key] = torch.zeros(8, 8, 1, 2, dtype=torch.float16)
    bad = write(tmp_path / "shape.safetensors", reshaped)
    with pytest.raises(SdkitError, match=f"{key.replace('.', '[.]')}: shapes differ"):
        merge_models(recipe([models["a"], bad]), tmp_path / "m.safetensors")
    with pytest.raises(SdkitError, match="takes 3 models"):
        merge_models(recipe([models["a"], models["b"]], "add_difference"), tmp_path / "m.safetensors")
    with pytest.raises(SdkitError, match="is one of the inputs"):
        merge_models(recipe([models["a"], models["b"]]), models["b"])

    class Full:
        free = 1000

    monkeypatch.setattr("sdkit.ops.merge.engine.shutil.disk_usage", lambda _: Full())
    with pytest.raises(SdkitError, match="GiB free"):
        merge_models(recipe([models["a"], models["b"]]), tmp_path / "m.safetensors")
    assert not list(tmp_path.glob("m.safetensors")) and not list(tmp_path.glob(".*partial"))


def test_precision_follows_a_unless_asked(models: dict[str, Path], tmp_path: Path) -> None:
    b32 = write(tmp_path / "b32.safetensors", checkpoint("sd1", 2, torch.float32))
    out = load_file(merge_models(recipe([models["a"], b32]), tmp_path / "m.safetensors").path)
    assert {v.dtype for k, v in out.items() if not k.endswith("position_ids")} == {torch.float16}
    out = load_file(merge_models(recipe([models["a"], b32], dtype="bf16"), tmp_path / "bf.safetensors").path)
    assert {v.dtype for k, v in out.items() if not k.endswith("position_ids")} == {torch.bfloat16}
    assert out["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_inpainting_a_keeps_its_extra_channels(models: dict[str, Path], tmp_path: Path) -> None:
    inpaint = checkpoint("sd1", 4)
    key = UNET + "input_blocks.0.0.weight"
    inpaint[key] = torch.randn(8, 9, 3, 3).half()
    a = write(tmp_path / "inpaint.safetensors", inpaint)
    b = load_file(models["b"])
    result = merge_models(recipe([a, models["b"]], params={"alpha": 0.5}), tmp_path / "m.safetensors")
    out = load_file(result.path)[key]
    assert torch.equal(out[:, 4:], inpaint[key][:, 4:])
    assert torch.allclose(out[:, :4].float(), (inpaint[key][:, :4].float() + b[key].float()) / 2, atol=1e-3)
    assert result.report.partial_channels == [key]
    with pytest.raises(SdkitError, match="inpainting"):
        merge_models(recipe([models["b"], a]), tmp_path / "wrong.safetensors")


def test_diffusers_folder_input_is_aligned_to_ldm_keys(models: dict[str, Path], tmp_path: Path) -> None:
    b = load_file(models["b"])
    folder = write_diffusers_folder(tmp_path / "b_diffusers", "sd1", b)
    out = load_file(merge_models(recipe([models["a"], folder], params={"alpha": 1.0}, take={"vae": "B"}),
                                 tmp_path / "m.safetensors").path)
    assert out.keys() == b.keys() and all(torch.equal(out[k], b[k]) for k in b)


def test_sdxl_merge_uses_its_twenty_blocks(tmp_path: Path) -> None:
    a, b = (write(tmp_path / f"{n}.safetensors", checkpoint("sdxl", s)) for n, s in (("a", 1), ("b", 2)))
    values = [0.0] * 20
    values[-1] = 1.0  # OUT08, which holds the final output layers
    out = load_file(merge_models(recipe([a, b], params={"alpha": 0.0}, blocks=values),
                                 tmp_path / "m.safetensors").path)
    base, other = load_file(a), load_file(b)
    layout = block_layout(base)
    assert {k for k in base if not torch.equal(out[k], base[k])} == \
        {k for k in base if layout.block_of(k) == "OUT08"}
    assert torch.equal(out[UNET + "out.2.bias"], other[UNET + "out.2.bias"])


def test_prefetch_stays_within_its_budget() -> None:
    ahead: list[int] = []
    running: set[str] = set()

    def compute(key: str) -> str:
        running.add(key)
        ahead.append(len(running))
        return key

    order = [f"k{i}" for i in range(12)]
    prefetcher = Prefetcher(compute, 3, cost=lambda key: 10, budget=20).start(order)
    with prefetcher:
        for key in ["k0", "k1", "k5", *order[2:5], *order[6:]]:  # one asked out of order
            assert prefetcher.get(key) == key
            running.discard(key)
    assert len(ahead) == len(order)  # each key computed once, the out-of-order one too
    assert max(ahead) <= 3  # the key asked for, plus at most `budget` worth ahead
    assert not running



def test_workers_with_one_thread_compute_what_one_thread_would() -> None:
    """A LAPACK call on workers given one thread gives one thread's bits every time (a
    fresh thread uses every core, and MKL varies the split with the load)."""
    matrix = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    with single_threaded_torch():
        alone = torch.linalg.svd(matrix, full_matrices=False).U
    order = list(range(40))
    svd = Prefetcher(lambda index: torch.linalg.svd(matrix.clone(), full_matrices=False).U, 2, threads=1)
    with svd.start(order) as ahead:
        assert all(torch.equal(ahead.get(index), alone) for index in order)

@pytest.mark.parametrize("method, letters, params, threads", [
    ("weighted_sum", "ab", {"alpha": 0.3}, 2),
    ("weighted_sum", "ab", {"alpha": 0.3}, 0),
    ("add_difference", "abc", {"alpha": 0.7}, 2),
    ("train_difference", "abc", {}, 1),
])
def test_tensors_written_in_pieces_are_the_same_bytes(models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, method: str,
                                                      letters: str, params: dict[str, float], threads: int) -> None:
    """Pieces made on the writer's worker threads (or on its own thread) come out in order."""
    import sdkit.ops.merge.compute as compute

    folder = write_diffusers_folder(tmp_path / "b-folder", "sd1", load_file(models["b"]))
    inputs = [folder if letter == "b" else models[letter] for letter in letters]  # spans through a key map too
    whole = merge_models(recipe(inputs, method, params=params), tmp_path / "whole.safetensors").path
    monkeypatch.setattr(compute, "PIECEWISE_BYTES", 0)
    monkeypatch.setattr(compute, "SLICE_ELEMENTS", 1000)  # many pieces, a ragged last one
    pieces = merge_models(recipe(inputs, method, params=params), tmp_path / "pieces.safetensors", threads=threads).path
    expected, produced = load_file(whole), load_file(pieces)
    assert produced.keys() == expected.keys()
    assert all(torch.equal(produced[k].view(-1).view(torch.uint8), expected[k].view(-1).view(torch.uint8))
               for k in expected)


def test_nan_in_a_piece_stops_the_merge(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sdkit.ops.merge.compute as compute

    broken = load_file(models["b"])
    key = next(k for k in broken if k.startswith(UNET) and broken[k].dim() == 4)
    broken[key].view(-1)[-1] = float("nan")
    b = write(tmp_path / "nan.safetensors", broken)
    monkeypatch.setattr(compute, "PIECEWISE_BYTES", 0)
    with pytest.raises(SdkitError, match="NaN"):
        merge_models(recipe([models["a"], b]), tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]
