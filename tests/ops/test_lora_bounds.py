"""Factors of a few MB whose product is 50 000 x 50 000: a plain LoRA is resized and
merged from its factors (QR of each, SVD of the small core) without forming the product;
deltas that must be formed (LoHa, LoKr, a clamped merge) are refused before allocation
when no base layer sizes them; factor shapes that cannot make the layer are refused
before their product is formed, in bake too.

The huge cases run the command in a fresh interpreter with its address space capped at
3 GiB (a 50 000 x 50 000 float32 product alone is 9.3 GiB), which reports its wall time
and peak RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdkit.ops.lora.svd import RankRule, factorize, factorize_product
from test_lora_support import write

NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"  # [32, 32, 1, 1] in the toy SD1
TOY = Path(__file__).resolve().parents[2] / "fixtures" / "toy" / "sd1" / "toy-sd1.safetensors"
HUGE = 50_000
ADDRESS_SPACE = 3 << 30
LIMIT_TEXT = "over the limit of 268,435,456"

_RUN = """
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from sdkit.cli.main import main
results = []
for argv in json.loads(sys.argv[2]):
    start, errors = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            main(["--quiet", *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "stderr": errors.getvalue(),
                    "seconds": time.perf_counter() - start})
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
print(json.dumps({"results": results, "peak_mib": peak}))
"""


def run_capped(*commands: list[str]) -> tuple[list[dict], float]:
    """Run sdkit commands one after another in a fresh interpreter capped at
    ADDRESS_SPACE: (each one's exit code, stderr and seconds; the peak RSS of all)."""
    result = subprocess.run([sys.executable, "-c", _RUN, str(ADDRESS_SPACE), json.dumps(commands)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["results"], report["peak_mib"]


def orthonormal(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))).Q


def spectral_lora(singular: list[float], alpha: float, seed: int, size: int = HUGE) -> dict:
    """A kohya module whose up @ down is U diag(σ) Vᵀ with known U, σ, V."""
    up = orthonormal(size, len(singular), seed) * torch.tensor(singular)
    down = orthonormal(size, len(singular), seed + 1).T.contiguous()
    return {f"{NAME}.lora_up.weight": up, f"{NAME}.lora_down.weight": down,
            f"{NAME}.alpha": torch.tensor(alpha)}


def applied(state: dict, probe: torch.Tensor) -> torch.Tensor:
    """scale · up @ (down @ probe): the module's delta on a few vectors, never formed."""
    up, down = state[f"{NAME}.lora_up.weight"].float(), state[f"{NAME}.lora_down.weight"].float()
    scale = float(state[f"{NAME}.alpha"]) / down.shape[0]
    return scale * (up @ (down @ probe))


def probes(seed: int = 9) -> torch.Tensor:
    return torch.randn(HUGE, 3, generator=torch.Generator().manual_seed(seed))


def test_resize_of_a_50k_square_lora_is_exact_and_small(tmp_path: Path) -> None:
    singular = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    state = spectral_lora(singular, alpha=4.0, seed=1)
    source = write(tmp_path / "big.safetensors", state)
    out = tmp_path / "small.safetensors"
    [report], peak_mib = run_capped(["lora", "resize", str(source), "-o", str(out), "--rank", "3",
                                     "--dtype", "fp32"])
    assert report["code"] == 0, report["stderr"]
    assert peak_mib < 800 and report["seconds"] < 60, (peak_mib, report)
    resized = load_file(str(out))
    assert resized[f"{NAME}.lora_down.weight"].shape == (3, HUGE)
    # the best rank-3 approximation is the first three components, at the input's scale
    best = {f"{NAME}.lora_up.weight": state[f"{NAME}.lora_up.weight"][:, :3],
            f"{NAME}.lora_down.weight": state[f"{NAME}.lora_down.weight"][:3],
            f"{NAME}.alpha": torch.tensor(4.0 / 8 * 3)}
    torch.testing.assert_close(applied(resized, probes()), applied(best, probes()), rtol=1e-4, atol=1e-5)
    assert out.stat().st_size < source.stat().st_size


def test_rank_merge_of_50k_square_loras_is_exact_and_small(tmp_path: Path) -> None:
    a = spectral_lora([3.0, 2.0, 1.0, 0.5], alpha=2.0, seed=3)
    b = spectral_lora([5.0, 1.0, 0.25, 0.1], alpha=4.0, seed=5)
    paths = [write(tmp_path / "a.safetensors", a), write(tmp_path / "b.safetensors", b)]
    out = tmp_path / "ab.safetensors"
    [report], peak_mib = run_capped(["lora", "merge", f"{paths[0]}:0.7", f"{paths[1]}:-0.4", "-o",
                                     str(out), "--rank", "8", "--dtype", "fp32"])
    assert report["code"] == 0, report["stderr"]
    assert peak_mib < 800 and report["seconds"] < 60, (peak_mib, report)
    merged = load_file(str(out))
    expected = 0.7 * applied(a, probes()) - 0.4 * applied(b, probes())  # rank 8: all of it
    torch.testing.assert_close(applied(merged, probes()), expected, rtol=1e-4, atol=1e-5)


def loha(size: int, halves_differ: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    second = (1, size) if halves_differ else (size, size)
    return {f"{NAME}.hada_w1_a": torch.randn(size, 2, generator=g),
            f"{NAME}.hada_w1_b": torch.randn(2, 1 if halves_differ else size, generator=g),
            f"{NAME}.hada_w2_a": torch.randn(second[0], 2, generator=g),
            f"{NAME}.hada_w2_b": torch.randn(2, second[1], generator=g),
            f"{NAME}.alpha": torch.tensor(1.0)}


def lokr(size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    side = int(size ** 0.5)
    return {f"{NAME}.lokr_w1": torch.randn(side, side, generator=g),
            f"{NAME}.lokr_w2_a": torch.randn(size // side, 4, generator=g),
            f"{NAME}.lokr_w2_b": torch.randn(4, size // side, generator=g),
            f"{NAME}.alpha": torch.tensor(1.0)}


def tucker_lora(size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"{NAME}.lora_up.weight": torch.randn(size, 4, 1, 1, generator=g),
            f"{NAME}.lora_down.weight": torch.randn(4, size, 1, 1, generator=g),
            f"{NAME}.lora_mid.weight": torch.randn(4, 4, 3, 3, generator=g),
            f"{NAME}.alpha": torch.tensor(1.0)}


LYCORIS = {"ss_network_module": "lycoris.kohya"}
OVERSIZED = {  # name -> (state, metadata, extra arguments, what the refusal says)
    "LoHa": (loha(HUGE), LYCORIS, [], LIMIT_TEXT),
    "LoHa, halves that broadcast": (loha(40_000, halves_differ=True), LYCORIS, [], "which differ"),
    "LoKr": (lokr(HUGE), LYCORIS, [], LIMIT_TEXT),
    "Tucker LoRA": (tucker_lora(20_000), None, [], LIMIT_TEXT),
    "plain LoRA, clamped merge": (spectral_lora([1.0, 0.5], 1.0, seed=7), None,
                                  ["--clamp-quantile", "0.99"], LIMIT_TEXT),
}


def glora_b_part(size: int) -> dict:
    g = torch.Generator().manual_seed(0)  # a1 a2 fit the 32-wide layer; b1 @ b2 is huge
    return {f"{NAME}.a1.weight": torch.randn(32, 4, generator=g),
            f"{NAME}.a2.weight": torch.randn(4, 32, generator=g),
            f"{NAME}.b1.weight": torch.randn(size, 4, generator=g),
            f"{NAME}.b2.weight": torch.randn(4, size, generator=g),
            f"{NAME}.alpha": torch.tensor(1.0)}


def loha_with_huge_second_half(size: int) -> dict:
    g = torch.Generator().manual_seed(0)  # the first half fits the layer, the second not
    return {f"{NAME}.hada_w1_a": torch.randn(32, 2, generator=g),
            f"{NAME}.hada_w1_b": torch.randn(2, 32, generator=g),
            f"{NAME}.hada_w2_a": torch.randn(size, 2, generator=g),
            f"{NAME}.hada_w2_b": torch.randn(2, size, generator=g),
            f"{NAME}.alpha": torch.tensor(1.0)}


BAKED = {  # factors whose shapes cannot make the toy's layer: refused before the product
    "GLoRA whose b1 @ b2 is 50 000 x 50 000": (glora_b_part(HUGE), "do not make the base weight's shape"),
    "LoHa whose second half is 50 000 x 50 000": (loha_with_huge_second_half(HUGE), "which differ"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], float, Path]:
    """Every refusal case run in one capped interpreter: case -> result, peak RSS, folder."""
    folder = tmp_path_factory.mktemp("refusals")
    commands, names = [], []
    for case, (state, metadata, extra, _) in OVERSIZED.items():
        source = write(folder / f"{len(names)}.safetensors", state, metadata)
        for command in ("resize", "merge"):
            if command == "resize" and "--clamp-quantile" in extra:
                continue  # resize has no clamp
            names.append(f"{command} {case}")
            commands.append(["lora", command, str(source), "-o", str(folder / "out.safetensors"),
                             "--rank", "4", *extra])
    for case, (state, _) in BAKED.items():
        source = write(folder / f"{len(names)}.safetensors", state, LYCORIS)
        names.append(f"bake {case}")
        commands.append(["lora", "bake", str(TOY), str(source), "-o", str(folder / "out.safetensors")])
    results, peak_mib = run_capped(*commands)
    return dict(zip(names, results)), peak_mib, folder


def assert_refused(result: dict, fragment: str) -> None:
    assert result["code"] == 1, result
    assert result["stderr"].startswith("sdkit: error: ") and result["stderr"].count("\n") == 1
    assert fragment in result["stderr"] and NAME in result["stderr"], result["stderr"]


@pytest.mark.parametrize("command,case", [(command, case) for case in OVERSIZED
                                          for command in ("resize", "merge")
                                          if command == "merge" or "--clamp-quantile" not in OVERSIZED[case][2]])
def test_dense_deltas_no_base_sizes_are_refused_before_forming(refusals, case: str,
                                                               command: str) -> None:
    results, peak_mib, folder = refusals
    assert_refused(results[f"{command} {case}"], OVERSIZED[case][3])
    assert peak_mib < 800 and not (folder / "out.safetensors").exists()


@pytest.mark.parametrize("case", list(BAKED))
def test_bake_refuses_factors_that_cannot_make_the_layer(refusals, case: str) -> None:
    results, peak_mib, folder = refusals
    assert_refused(results[f"bake {case}"], BAKED[case][1])
    assert peak_mib < 800 and not (folder / "out.safetensors").exists()


# ---- the factored SVD against the full-product SVD ---------------------------------------

SHAPES = [  # (out, in, kernel, inner rank)
    (24, 20, (), 6), (20, 24, (), 6), (5, 40, (), 8), (40, 5, (), 8), (16, 8, (3, 3), 4),
    (32, 32, (1, 1), 4), (12, 12, (), 12),
]
RULES = [RankRule(2), RankRule(6), RankRule(16), RankRule(8, dynamic="sv_ratio", value=4.0),
         RankRule(8, dynamic="sv_fro", value=0.95), RankRule(8, dynamic="sv_cumulative", value=0.8)]


@pytest.mark.parametrize("out,inputs,kernel,inner", SHAPES)
@pytest.mark.parametrize("rule", RULES, ids=lambda rule: f"{rule.dynamic or 'rank'}-{rule.rank}")
def test_factored_svd_is_the_full_products_within_rounding(out, inputs, kernel, inner,
                                                           rule) -> None:
    generator = torch.Generator().manual_seed(out * 100 + inputs)
    up = torch.randn(out, inner, *((1, 1) if kernel else ()), generator=generator)
    down = torch.randn(inner, inputs, *kernel, generator=generator)
    product = (up.flatten(1) @ down.flatten(1)).reshape(out, inputs, *kernel)
    full = factorize(product, rule)
    factored = factorize_product(up, down, rule)
    assert factored.rank == full.rank
    assert factored.up.shape == full.up.shape and factored.down.shape == full.down.shape
    assert factored.retained == pytest.approx(full.retained, rel=1e-5)
    rebuilt = factored.up.flatten(1) @ factored.down.flatten(1)
    torch.testing.assert_close(rebuilt, full.up.flatten(1) @ full.down.flatten(1),
                               rtol=1e-4, atol=1e-4 * float(product.abs().max()))


@pytest.mark.parametrize("up_shape,down_shape", [
    ((10, 3), (3, 7)),  # a zero up
    ((10, 0), (0, 7)),  # rank 0
    ((0, 3), (3, 7)), ((10, 3), (3, 0)), ((10, 0, 1, 1), (0, 4, 3, 3)),  # empty layers
])
def test_factored_svd_of_zero_and_empty_products_is_rank_one(up_shape, down_shape) -> None:
    rule = RankRule(4)
    up, down = torch.zeros(up_shape), torch.randn(down_shape)
    product = (up.flatten(1) @ down.flatten(1)).reshape(up_shape[0], *down_shape[1:])
    full, factored = factorize(product, rule), factorize_product(up, down, rule)
    assert (factored.rank, factored.retained) == (full.rank, full.retained) == (1, 1.0)
    assert factored.up.shape == full.up.shape and factored.down.shape == full.down.shape
    assert not factored.up.any()
