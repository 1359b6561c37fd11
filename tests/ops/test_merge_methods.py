"""Each merge method against its formula, on small literal tensors checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sdkit.errors import SdkitError
from sdkit.ops.merge import METHODS, get_method, merge_method
from sdkit.ops.merge.methods import key_seed


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(name: str, *tensors: torch.Tensor, key: str = "k", **params: object) -> torch.Tensor:
    method = get_method(name)
    resolved = method.resolve_params(params)
    method.check_params(resolved)
    return method(list(tensors), resolved, key)


def test_weighted_sum_formula_and_exact_ends() -> None:
    a, b = t(0, 1, 2, -4), t(4, 3, 2, 0)
    assert torch.allclose(run("weighted_sum", a, b, alpha=0.25), t(1, 1.5, 2, -3))
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(run("weighted_sum", a, b, alpha=0.0), a)
    assert torch.equal(run("weighted_sum", a, b, alpha=1.0), b)


def test_add_difference_formula() -> None:
    out = run("add_difference", t(1, 2, 3), t(2, 2, 5), t(1, 3, 1), alpha=0.5)
    assert torch.allclose(out, t(1.5, 1.5, 5))


def test_train_difference_formula_and_zero_over_zero() -> None:
    a, b, c = t(0, 1, 2, 5, 0), t(1, 1, 4, 5, 3), t(0, 3, 4, 5, 1)
    # per element: A + 1.8·α·(B−C)·|B−A| / (|B−C| + |B−A|), 0 where both distances are 0
    # e0: 0 + 1.8·1·0.5 = 0.9; e1: |B−A| = 0 → 1; e2: B = C → 2; e3: 0/0 → 5;
    # e4: 0 + 1.8·2·3/5 = 2.16
    assert torch.allclose(run("train_difference", a, b, c, alpha=1.0), t(0.9, 1, 2, 5, 2.16))
    assert torch.allclose(run("train_difference", a, b, c, alpha=0.5), t(0.45, 1, 2, 5, 1.08))
    assert torch.isfinite(run("train_difference", t(1), t(1), t(1))).all()


def test_n_average() -> None:
    assert torch.equal(run("n_average", t(1, 2), t(3, 4), t(5, 9)), t(3, 5))


def test_copy_takes_the_named_input() -> None:
    a, b = t(1, 2), t(3, 4)
    assert torch.equal(run("copy", a, b, source="B"), b)
    assert torch.equal(run("copy", a, b), a)
    with pytest.raises(SdkitError, match="source"):
        run("copy", a, b, source="B2")


def test_ties_trims_elects_and_averages_disjointly() -> None:
    base = torch.ones(6)
    delta_1 = t(1, -2, 3, 0.5, -1.5, 0)  # top half by magnitude: 3, -2, -1.5
    delta_2 = t(-3, -1, 1.2, 0.4, 2, 0)  # top half: -3, 2, 1.2
    # trimmed: [0,-2,3,0,-1.5,0] and [-3,0,1.2,0,2,0]; sum [-3,-2,4.2,0,0.5,0] elects
    # signs [-,-,+,0,+,0]; agreeing entries averaged: [-3, -2, (3+1.2)/2, 0, 2, 0]
    expected_delta = t(-3, -2, 2.1, 0, 2, 0)
    out = run("ties", base, base + delta_1, base + delta_2, k=0.5, alpha=1.0)
    assert torch.allclose(out, base + expected_delta)
    out = run("ties", base, base + delta_1, base + delta_2, k=0.5, alpha=0.5)
    assert torch.allclose(out, base + 0.5 * expected_delta)


def test_ties_keeps_everything_at_k_one() -> None:
    base = t(0, 0, 0)
    out = run("ties", base, t(1, -1, 2), t(3, 1, -1), k=1.0)
    # signs elected from sums [4, 0, 1]: e0 mean(1,3)=2; e1 sum 0 → sign 0 → 0; e2 only 2 agrees
    assert torch.allclose(out, t(2, 0, 2))
    with pytest.raises(SdkitError, match="k must be"):
        run("ties", base, t(1, 1, 1), k=0.0)


def _dare_mask(seed: int, index: int, key: str, shape: tuple[int, ...], p: float) -> torch.Tensor:
    # the documented rule: uniform draws from a generator seeded by the 64-bit prefix of
    # sha256("seed\0index\0key") (little endian, shifted to 63 bits), kept where >= p
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{index}\0{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(shape, generator=generator) >= p


def test_dare_drops_and_rescales_with_the_documented_seed() -> None:
    base = torch.linspace(-1, 1, 1000)
    delta_1, delta_2 = torch.full((1000,), 0.5), torch.linspace(0, 2, 1000)
    out = run("dare", base, base + delta_1, base + delta_2, p=0.75, seed=7, alpha=0.5, key="w")
    keep_1, keep_2 = _dare_mask(7, 1, "w", (1000,), 0.75), _dare_mask(7, 2, "w", (1000,), 0.75)
    expected = base + 0.5 * (keep_1 * delta_1 / 0.25 + keep_2 * delta_2 / 0.25)
    assert torch.allclose(out, expected, atol=1e-5)
    assert 0.2 < keep_1.float().mean() < 0.3  # about 1 − p kept
    assert key_seed(7, 1, "w") != key_seed(7, 1, "v")


def test_dare_depends_on_key_and_seed_not_on_call_order() -> None:
    base, model = torch.zeros(64), torch.ones(64)
    first = run("dare", base, model, p=0.5, key="x")
    run("dare", base, model, p=0.5, key="y")
    assert torch.equal(run("dare", base, model, p=0.5, key="x"), first)
    assert not torch.equal(run("dare", base, model, p=0.5, key="y"), first)
    assert not torch.equal(run("dare", base, model, p=0.5, key="x", seed=1), first)
    assert torch.equal(run("dare", base, model, p=0.0, key="x"), model)
    with pytest.raises(SdkitError, match="p"):
        run("dare", base, model, p=1.0)


def test_dare_with_ties_uses_the_disjoint_mean() -> None:
    base = torch.zeros(4)
    out = run("dare", base, t(1, -1, 2, 2), t(3, 1, -2, 2), p=0.0, ties=True)
    # sums [4, 0, 0, 4]: e0 mean(1,3), e1/e2 sign 0 → 0, e3 mean(2,2)
    assert torch.allclose(out, t(2, 0, 0, 2))


def test_slerp_formula_and_fallbacks() -> None:
    # orthogonal: ω = π/2, direction (â+b̂)·sin(π/4), rescaled to the lerped norm 3
    out = run("slerp", t(2, 0), t(0, 4), alpha=0.5)
    assert torch.allclose(out, t(3 / math.sqrt(2), 3 / math.sqrt(2)))
    # α = 0.25 between 0° and 60°: unit direction at 15°, norm 1
    a, b = t(1, 0), t(0.5, math.sqrt(3) / 2)
    assert torch.allclose(run("slerp", a, b, alpha=0.25),
                          t(math.cos(math.pi / 12), math.sin(math.pi / 12)), atol=1e-6)
    assert torch.equal(run("slerp", t(1, 2), t(2, 4), alpha=0.5), t(1.5, 3))  # parallel
    assert torch.equal(run("slerp", t(1, 0), t(-1, 0), alpha=0.5), t(0, 0))  # anti-parallel
    assert torch.equal(run("slerp", t(0, 0), t(2, 4), alpha=0.5), t(1, 2))  # zero norm


def test_slerp_does_not_depend_on_torch_thread_count() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3_000_000, generator=generator), torch.randn(3_000_000, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run("slerp", a, b, alpha=0.3)
        torch.set_num_threads(max(2, threads))
        multi = run("slerp", a, b, alpha=0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_parameters_are_typed_and_checked() -> None:
    method = get_method("dare")
    assert method.resolve_params({"seed": "12", "ties": "yes", "p": "0.5"}) == {
        "alpha": 1.0, "p": 0.5, "seed": 12, "ties": True}
    with pytest.raises(SdkitError, match="has no parameter beta"):
        method.resolve_params({"beta": 1})
    with pytest.raises(SdkitError, match="seed must be int"):
        method.resolve_params({"seed": 1.5})
    with pytest.raises(SdkitError, match="takes 3 models, got 2"):
        get_method("add_difference").check_inputs(2)
    with pytest.raises(SdkitError, match="takes 2 or more models"):
        get_method("ties").check_inputs(1)
    with pytest.raises(SdkitError, match="unknown merge method"):
        get_method("average-ish")
    assert get_method("add-difference") is METHODS["add_difference"]


def test_decorator_reads_the_signature() -> None:
    def scaled(a: torch.Tensor, *, factor: float = 2.0, key: str = "") -> torch.Tensor:
        """a times factor."""
        return a * factor

    merge_method(scaled, name="test_scaled")
    try:
        method = METHODS["test_scaled"]
        assert (method.min_inputs, method.max_inputs, method.wants_key) == (1, 1, True)
        assert method.params["factor"].default == 2.0 and not method.has_alpha
        assert method.doc == "a times factor."
    finally:
        del METHODS["test_scaled"]

    def untyped(a: torch.Tensor, *, factor=2.0) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return a

    with pytest.raises(TypeError, match="factor"):
        merge_method(untyped, name="test_untyped")
