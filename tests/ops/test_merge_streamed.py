"""The streamed forms of TIES, DARE and SLERP give the numbers of their whole-tensor forms:
random tensors with many tied magnitudes, sizes that are not a multiple of the slice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdkit.ops.merge import MergeRecipe, RecipeInput, get_method, merge_models
from sdkit.ops.merge import streamed
from sdkit.io.float8 import to_float32
from sdkit.ops.merge.streamed import tensor_reader, top_fraction_thresholds
from test_merge_support import checkpoint, write

SIZE = 10_007  # not a multiple of any slice below


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamed, "PASS_SLICE", 1000)
    monkeypatch.setattr(streamed, "REDUCE_SLICE", 3000)


def tied(seed: int, size: int = SIZE, levels: int = 9) -> torch.Tensor:
    """Values on a coarse grid: most magnitudes occur many times."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (size,), generator=generator) * 0.125).float()


def smooth(seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def streamed_result(name: str, tensors: list[torch.Tensor], key: str = "k", **params: object) -> torch.Tensor:
    method = get_method(name)
    resolved = method.resolve_params(params)
    pieces = list(method.stream(tensor_reader(tensors), resolved, key))
    return torch.cat([piece.reshape(-1) for piece in pieces]).reshape(tensors[0].shape)


def whole_result(name: str, tensors: list[torch.Tensor], key: str = "k", **params: object) -> torch.Tensor:
    method = get_method(name)
    return method(tensors, method.resolve_params(params), key)


def assert_same_bits(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("k", [1e-4, 0.2, 0.5, 0.9, 1 - 1 / SIZE, 1.0])
@pytest.mark.parametrize("make", [tied, smooth])
def test_streamed_threshold_is_the_exact_kth_largest_magnitude(k: float, make: object) -> None:
    base, model, other = make(1), make(2), make(3)  # type: ignore[operator]
    thresholds = top_fraction_thresholds(tensor_reader([base, model, other]), k)
    keep = math.ceil(k * SIZE)
    for threshold, task in zip(thresholds, (model, other)):
        if keep >= SIZE:
            assert threshold is None
            continue
        magnitudes = (task - base).abs()
        assert threshold == float(magnitudes.topk(keep).values[-1])
        assert threshold == float(magnitudes.kthvalue(SIZE - keep + 1).values)


def float8_inputs(dtypes: tuple[torch.dtype, ...], nan: bool) -> list[torch.Tensor]:
    """Random bytes seen as float8 (every pattern, NaN included when asked), with runs of
    equal values so that magnitudes tie."""
    generator = torch.Generator().manual_seed(len(dtypes))
    made = []
    for index, dtype in enumerate(dtypes):
        raw = torch.randint(0, 256, (SIZE,), generator=generator, dtype=torch.int32).to(torch.uint8)
        raw[index * 50:index * 50 + 2000] = 0x38  # 1.0 in e4m3fn, 0.5 in e5m2
        if not nan:
            raw[(raw & 0x7F) >= (0x7F if dtype == torch.float8_e4m3fn else 0x7C)] = 0x11
        made.append(raw.view(dtype))
    return made


@pytest.mark.parametrize("k", [1e-4, 0.2, 0.5, 0.999])
@pytest.mark.parametrize("dtypes, nan", [
    ((torch.float8_e4m3fn,) * 3, False),
    ((torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fn), False),
    ((torch.float8_e5m2,) * 3, True),
    ((torch.float8_e4m3fn,) * 3, True),
])
def test_float8_thresholds_counted_by_byte_pairs_equal_the_widened_count(k: float, dtypes: tuple[torch.dtype, ...],
                                                                        nan: bool) -> None:
    stored = float8_inputs(dtypes, nan)
    by_pairs = tensor_reader(stored)
    assert by_pairs.stored is not None
    widened = streamed.SliceReader(SIZE, 3, by_pairs.read)  # no stored form: the two counting passes
    expected = top_fraction_thresholds(widened, k)
    assert [repr(t) for t in top_fraction_thresholds(by_pairs, k)] == [repr(t) for t in expected]
    finite = [to_float32(tensor) for tensor in stored]
    for threshold, task in zip(expected, finite[1:]):
        magnitudes = (task - finite[0]).abs()
        if not nan:
            assert threshold == float(magnitudes.topk(math.ceil(k * SIZE)).values[-1])


def test_streamed_threshold_of_a_constant_delta_holds_no_bucket() -> None:
    # every magnitude equal: the answer's bucket is the whole tensor, which is counted,
    # never gathered
    base = torch.zeros(SIZE)
    assert top_fraction_thresholds(tensor_reader([base, base + 0.3]), 0.2) == [float(torch.tensor(0.3))]


@pytest.mark.parametrize("make", [tied, smooth])
@pytest.mark.parametrize("params", [{"k": 0.2}, {"k": 0.5, "alpha": 0.7}, {"k": 1.0}])
@pytest.mark.parametrize("models", [1, 2, 3])
def test_ties_streamed_equals_whole(make: object, params: dict[str, float], models: int) -> None:
    tensors = [make(seed) for seed in range(models + 1)]  # type: ignore[operator]
    assert_same_bits(streamed_result("ties", tensors, **params), whole_result("ties", tensors, **params))


def awkward(seed: int) -> torch.Tensor:
    """Tied values with signed zeros, subnormals and the smallest normals among them."""
    values = tied(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    spots = torch.randint(0, SIZE, (600,), generator=generator)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1.17549435e-38, 0.125, -0.125])
    values[spots] = specials[torch.arange(600) % len(specials)]
    return values


@pytest.mark.parametrize("k", [0.05, 0.3, 0.8, 0.999])
def test_ties_float_only_path_keeps_signed_zeros_and_subnormals(k: float) -> None:
    tensors = [awkward(seed) for seed in range(3)]
    assert_same_bits(streamed_result("ties", tensors, k=k), whole_result("ties", tensors, k=k))
    zero_threshold = [torch.zeros(SIZE), awkward(1) * (torch.arange(SIZE) % 10 == 0), awkward(2)]
    assert_same_bits(streamed_result("ties", zero_threshold, k=0.5), whole_result("ties", zero_threshold, k=0.5))


def test_ties_slices_holding_nan_or_inf_take_the_general_path() -> None:
    tensors = [awkward(seed) for seed in range(3)]
    tensors[1][5] = float("nan")
    tensors[2][2500] = float("inf")
    tensors[2][7000] = float("-inf")
    ours, reference = streamed_result("ties", tensors, k=0.3), whole_result("ties", tensors, k=0.3)
    assert_same_bits(ours, reference)
    assert not torch.isfinite(reference).all()


@pytest.mark.parametrize("params", [{}, {"p": 0.5, "seed": 3, "alpha": 0.6}, {"p": 0.3, "ties": True},
                                    {"p": 0.0}])
@pytest.mark.parametrize("models", [1, 2])
def test_dare_streamed_draws_the_whole_tensor_masks(params: dict[str, object], models: int) -> None:
    tensors = [tied(seed).reshape(-1, 1) for seed in range(models + 1)]
    for key in ("x", "model.diffusion_model.out.2.weight"):
        assert_same_bits(streamed_result("dare", tensors, key, **params),
                         whole_result("dare", tensors, key, **params))


@pytest.mark.parametrize("params", [{"p": 0.5}, {"p": 0.9, "alpha": -0.5}, {"p": 0.3, "ties": True},
                                    {"p": 0.0}])
def test_dare_keeps_the_bytes_where_signed_zeros_meet(params: dict[str, object]) -> None:
    # every pairing of ±0 in A against ±0 and small values in B and C, dropped and kept
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-45, -0.5, 0.25])
    base = zeros.repeat(SIZE // len(zeros) + 1)[:SIZE]
    tensors = [base, zeros.roll(1).repeat(SIZE // 7 + 1)[:SIZE], zeros.roll(3).repeat(SIZE // 7 + 1)[:SIZE]]
    for count in (2, 3):
        assert_same_bits(streamed_result("dare", tensors[:count], **params),
                         whole_result("dare", tensors[:count], **params))
    tensors[2][17] = float("inf")  # a non-finite task vector takes the general path
    assert_same_bits(streamed_result("dare", tensors, **params), whole_result("dare", tensors, **params))


def test_torch_draws_a_stream_in_slices_as_it_draws_it_whole() -> None:
    # what the streamed DARE relies on: torch's CPU `rand` takes one number per element,
    # in order, from the generator
    whole = torch.rand(SIZE, generator=torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    sliced = torch.cat([torch.rand(min(999, SIZE - start), generator=generator) for start in range(0, SIZE, 999)])
    assert torch.equal(whole, sliced)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("pair", ["random", "parallel", "zero"])
def test_slerp_streamed_equals_whole(alpha: float, pair: str) -> None:
    a = smooth(1).reshape(1, -1)
    b = {"random": smooth(2).reshape(1, -1), "parallel": 2 * a, "zero": torch.zeros_like(a)}[pair]
    assert_same_bits(streamed_result("slerp", [a, b], alpha=alpha), whole_result("slerp", [a, b], alpha=alpha))


@pytest.mark.parametrize("name, inputs", [("ties", 3), ("dare", 3), ("slerp", 2)])
def test_the_streamed_forms_read_slices_in_at_most_three_passes(name: str, inputs: int) -> None:
    flat = tensor_reader([smooth(seed) for seed in range(inputs)])
    sizes: list[int] = []

    def read(start: int, size: int) -> list[torch.Tensor]:
        sizes.append(size)
        return flat.read(start, size)

    method = get_method(name)
    for _ in method.stream(streamed.SliceReader(flat.count, inputs, read), method.resolve_params({}), "k"):
        pass
    assert max(sizes) <= max(streamed.PASS_SLICE, streamed.REDUCE_SLICE)
    assert sum(sizes) <= 3 * SIZE


# ---------------------------------------------------------------- through the engine


def recipe(paths: list[Path], method: str, params: dict[str, object]) -> MergeRecipe:
    return MergeRecipe([RecipeInput(str(p)) for p in paths], method, params=params)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    return [write(folder / f"{seed}.safetensors", checkpoint("sd1", seed)) for seed in (1, 2, 3)]


@pytest.mark.parametrize("method, count, params", [
    ("ties", 3, {"k": 0.3}),
    ("dare", 3, {"p": 0.5, "seed": 5}),
    ("dare", 2, {"p": 0.2, "ties": True}),
    ("slerp", 2, {"alpha": 0.4}),
])
def test_merged_files_equal_the_whole_tensor_method(models: list[Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, method: str,
                                                    count: int, params: dict[str, object]) -> None:
    import sdkit.ops.merge.compute as compute

    inputs = models[:count]
    mapped = load_file(merge_models(recipe(inputs, method, params), tmp_path / "mapped.safetensors").path)
    monkeypatch.setattr(compute, "PIECEWISE_BYTES", 0)  # every merged key read from the files a slice at a time
    read = load_file(merge_models(recipe(inputs, method, params), tmp_path / "read.safetensors").path)
    tensors = [load_file(path) for path in inputs]
    whole = get_method(method)
    resolved = whole.resolve_params(params)
    merged = 0
    for key, produced in read.items():
        assert torch.equal(produced, mapped[key]), key
        if not key.startswith("model.diffusion_model.") or not produced.is_floating_point():
            continue
        expected = whole([t[key].float() for t in tensors], resolved, key).to(produced.dtype)
        assert torch.equal(produced.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), key
        merged += 1
    assert merged > 10


# ---------------------------------------------------------------- fp8 inputs


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fp8")
    paths = []
    for seed in (1, 2):
        tensors = checkpoint("sd1", seed, dtype=torch.float8_e4m3fn)
        if seed == 2:  # a NaN where B is used only through the merge
            key = next(k for k in tensors if k.startswith("model.diffusion_model.") and tensors[k].dim() == 4)
            tensors[key].view(-1)[:3] = torch.tensor([float("nan"), 448, -448]).to(torch.float8_e4m3fn)
        paths.append(write(folder / f"{seed}.safetensors", tensors))
    return paths


@pytest.mark.parametrize("piecewise_bytes", [None, 0])
@pytest.mark.parametrize("method, params", [("weighted_sum", {"alpha": 0.3}), ("slerp", {"alpha": 0.3}),
                                            ("ties", {"k": 0.3})])  # TIES: thresholds counted by byte pairs
def test_fp8_merges_are_the_bytes_of_torch_conversions(fp8_models: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, piecewise_bytes: int | None,
                                                     method: str, params: dict[str, float]) -> None:
    import sdkit.ops.merge.compute as compute

    if piecewise_bytes is not None:
        monkeypatch.setattr(compute, "PIECEWISE_BYTES", piecewise_bytes)
    monkeypatch.setattr(compute, "SLICE_ELEMENTS", 1000)
    result = merge_models(MergeRecipe([RecipeInput(str(p)) for p in fp8_models], method, params=params,
                                      allow_nan=True), tmp_path / "m.safetensors")
    merged = load_file(result.path)
    a, b = (load_file(path) for path in fp8_models)
    whole = get_method(method)
    reference_non_finite = 0
    for key, produced in merged.items():
        if not key.startswith("model.diffusion_model.") or not produced.is_floating_point():
            continue
        reference = whole([a[key].to(torch.float32), b[key].to(torch.float32)], whole.resolve_params(params), key)
        assert torch.equal(produced.view(torch.uint8), reference.to(torch.float8_e4m3fn).view(torch.uint8)), key
        reference_non_finite += int((~torch.isfinite(reference.to(torch.float8_e4m3fn).float())).sum())
    # the NaN of B, where the method carries it to the output, counted (float8 has no isfinite)
    assert sum(result.non_finite.values()) == reference_non_finite
    assert reference_non_finite >= (0 if method == "ties" else 1)


# ---------------------------------------------------------------- GGUF inputs

TOY_FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "flux" / "toy-flux.safetensors"


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """toy-flux, its GGUF Q8_0 and Q5_1 copies (written by sdkit), and a changed twin."""
    from cli_run import exit_code

    folder = tmp_path_factory.mktemp("gguf")
    tensors = load_file(TOY_FLUX)
    generator = torch.Generator().manual_seed(4)
    twin = {key: (value.float() + 0.01 * torch.randn(value.shape, generator=generator)).to(value.dtype)
            if value.is_floating_point() else value for key, value in tensors.items()}
    paths = {"twin": write(folder / "twin.safetensors", twin)}
    for quant in ("Q8_0", "Q5_1"):
        paths[quant] = folder / f"toy-flux-{quant}.gguf"
        assert exit_code(["convert", str(TOY_FLUX), "--to", "gguf", "--quant", quant, "-o", str(paths[quant])]) == 0
    return paths


def gguf_values(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as the gguf package dequantizes it whole (in the file's own names)."""
    import gguf

    values = {}
    for tensor in gguf.GGUFReader(path).tensors:
        dense = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values[tensor.name] = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    return values


@pytest.mark.parametrize("quant", ["Q8_0", "Q5_1"])
@pytest.mark.parametrize("method, params", [("weighted_sum", {"alpha": 0.3}), ("ties", {"k": 0.3})])
def test_gguf_inputs_are_read_a_slice_of_blocks_at_a_time(gguf_models: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, quant: str,
                                                          method: str, params: dict[str, float]) -> None:
    import sdkit.ops.merge.compute as compute
    from sdkit.io import open_model

    import sdkit.io.gguf_reader as gguf_reader

    def never_whole(self: object, entry: object) -> None:
        raise AssertionError("a quantized GGUF tensor was dequantized whole")

    monkeypatch.setattr(compute, "PIECEWISE_BYTES", 0)  # every merged key in pieces
    monkeypatch.setattr(compute, "SLICE_ELEMENTS", 1000)  # slices that start inside a block
    monkeypatch.setattr(gguf_reader._GgufTensors, "_dequantized", never_whole)
    inputs = [gguf_models[quant], gguf_models["twin"]]
    with open_model(inputs[0]) as model:
        quantized = [name for name, info in model.infos.items() if model.elements(name) is not None]
    assert len(quantized) > 10
    merged = load_file(merge_models(MergeRecipe([RecipeInput(str(p)) for p in inputs], method, params=params),
                                    tmp_path / "m.safetensors").path)
    whole, twin = gguf_values(inputs[0]), load_file(inputs[1])
    reference = get_method(method)
    checked = 0
    for key, produced in merged.items():
        stored = whole.get(key.removeprefix("model.diffusion_model."), whole.get(key))
        if key not in twin or stored is None or not produced.is_floating_point():
            continue
        expected = reference([stored.reshape(twin[key].shape), twin[key].float()],
                             reference.resolve_params(params), key).to(produced.dtype)
        assert torch.equal(produced.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), key
        checked += 1
    assert checked >= len(quantized)
