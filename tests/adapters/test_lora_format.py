"""Parsing of hand-built LoRA-family state dicts (every key dialect, scale rules,
what is refused and why) and the deltas of layouts no installed peer writes, checked
against the reference formulas of kohya, A1111 and ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdkit.adapters.lora_format import parse_lora, split_key
from sdkit.adapters.lora_math import delta_weight, needs_base_weight
from sdkit.errors import SdkitError
from sdkit.io.lazy import LazyTensor
from sdkit.io.model_file import ModelFile, TensorInfo, model_from_tensors

pytestmark = pytest.mark.usefixtures("single_thread")

def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


UP, DOWN = rand(6, 4, seed=1), rand(4, 5, seed=2)
# (up key, down key) for one module, in every dialect ComfyUI reads.
DIALECTS = {
    "kohya": ("lora_unet_mid.lora_up.weight", "lora_unet_mid.lora_down.weight", "lora_unet_mid"),
    "diffusers-attn-processor": ("mid.processor.to_q_lora.up.weight",
                                 "mid.processor.to_q_lora.down.weight", "mid.processor.to_q"),
    "peft": ("unet.mid.lora_B.weight", "unet.mid.lora_A.weight", "unet.mid"),
    "peft-default": ("mid.lora_B.default.weight", "mid.lora_A.default.weight", "mid"),
    "lora.up": ("unet.mid.lora.up.weight", "unet.mid.lora.down.weight", "unet.mid"),
    "mochi": ("transformer.mid.lora_B", "transformer.mid.lora_A", "transformer.mid"),
    "te-linear-layer": ("text_encoder.q.lora_linear_layer.up.weight",
                        "text_encoder.q.lora_linear_layer.down.weight", "text_encoder.q"),
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_up_down_dialect_reads_as_lora(dialect):
    up_key, down_key, name = DIALECTS[dialect]
    parsed = parse_lora({up_key: UP, down_key: DOWN, f"{name}.alpha": torch.tensor(2.0)})
    module = parsed.modules[name]
    assert (module.type, module.rank, module.alpha, module.scale) == ("lora", 4, 2.0, 0.5)
    assert module.keys == {"up": up_key, "down": down_key, "alpha": f"{name}.alpha"}
    d_weight, d_bias = delta_weight(module, None, strength=0.6)
    torch.testing.assert_close(d_weight, 0.6 * 0.5 * UP @ DOWN)
    assert d_bias is None and not parsed.unrecognised


def test_kohya_conv_lora_matches_kohya_merge_and_scale_is_applied_once():
    """kohya merges a 3x3 LoRA as conv2d(down^T, up)^T; alpha 1 over rank 4."""
    up, down = rand(8, 4, 1, 1, seed=3), rand(4, 6, 3, 3, seed=4)
    parsed = parse_lora({"lora_unet_c.lora_up.weight": up, "lora_unet_c.lora_down.weight": down,
                         "lora_unet_c.alpha": torch.tensor(1.0)})
    base = rand(8, 6, 3, 3, seed=5)
    d_weight, _ = delta_weight(parsed.modules["lora_unet_c"], base, strength=1.0)
    kohya = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    torch.testing.assert_close(d_weight, kohya * 0.25)
    assert not torch.allclose(d_weight, kohya * 0.25 ** 2)


def test_loha_and_lokr_scale_is_applied_once():
    w1a, w1b, w2a, w2b = rand(6, 2, seed=1), rand(2, 5, seed=2), rand(6, 2, seed=3), rand(2, 5, seed=4)
    loha = parse_lora({"h.hada_w1_a": w1a, "h.hada_w1_b": w1b, "h.hada_w2_a": w2a,
                       "h.hada_w2_b": w2b, "h.alpha": torch.tensor(1.0)}).modules["h"]
    torch.testing.assert_close(delta_weight(loha, None)[0], 0.5 * (w1a @ w1b) * (w2a @ w2b))

    k1, k2a, k2b = rand(2, 3, seed=5), rand(4, 2, seed=6), rand(2, 5, seed=7)
    lokr = parse_lora({"k.lokr_w1": k1, "k.lokr_w2_a": k2a, "k.lokr_w2_b": k2b,
                       "k.alpha": torch.tensor(1.0)}).modules["k"]
    torch.testing.assert_close(delta_weight(lokr, rand(8, 15))[0],
                               0.5 * torch.kron(k1, k2a @ k2b))


def test_lokr_rank_comes_from_the_factored_half():
    """ComfyUI/A1111: the divisor is w2_b's rank, else w1_b's; two full halves: none."""
    w1a, w1b, w2 = rand(2, 1, seed=1), rand(1, 3, seed=2), rand(4, 5, seed=3)
    lokr = parse_lora({"k.lokr_w1_a": w1a, "k.lokr_w1_b": w1b, "k.lokr_w2": w2,
                       "k.alpha": torch.tensor(3.0)}).modules["k"]
    assert (lokr.rank, lokr.scale) == (1, 3.0)
    torch.testing.assert_close(delta_weight(lokr, None)[0], 3.0 * torch.kron(w1a @ w1b, w2))
    full = parse_lora({"k.lokr_w1": w1a @ w1b, "k.lokr_w2": w2,
                       "k.alpha": torch.tensor(3.0)}).modules["k"]
    assert (full.rank, full.scale) == (None, 1.0)


@pytest.mark.parametrize("alpha, expected", [(None, 1.0), (0.0, 1.0), (8.0, 2.0)])
def test_alpha_missing_or_zero_means_no_scaling(alpha, expected):
    tensors = {"m.lora_up.weight": UP, "m.lora_down.weight": DOWN}
    if alpha is not None:
        tensors["m.alpha"] = torch.tensor(alpha)
    assert parse_lora(tensors).modules["m"].scale == expected


def test_explicit_scale_key_wins_and_default_alpha_only_fills_gaps():
    tensors = {"a.lora_up.weight": UP, "a.lora_down.weight": DOWN, "a.alpha": torch.tensor(2.0),
               "b.lora_up.weight": UP, "b.lora_down.weight": DOWN, "b.scale": torch.tensor(0.3),
               "c.lora_up.weight": UP, "c.lora_down.weight": DOWN}
    modules = parse_lora(tensors, default_alpha=1.0).modules
    assert [modules[n].scale for n in "abc"] == [0.5, pytest.approx(0.3), 0.25]
    assert parse_lora(tensors, rank_override=2).modules["a"].scale == 1.0


def test_ia3_full_norm_and_bias_deltas():
    base = rand(6, 5, seed=9)
    tensors = {"i.weight": rand(5, seed=1), "i.on_input": torch.tensor(1),
               "o.weight": rand(6, seed=2), "o.on_input": torch.tensor(0),
               "f.diff": rand(6, 5, seed=3), "f.diff_b": rand(6, seed=4),
               "n.w_norm": rand(6, seed=5), "n.b_norm": rand(6, seed=6),
               "b.diff_b": rand(6, seed=7)}
    modules = parse_lora(tensors).modules
    assert {n: m.type for n, m in modules.items()} == {
        "i": "ia3", "o": "ia3", "f": "full", "n": "norm", "b": "full"}
    torch.testing.assert_close(delta_weight(modules["i"], base, 0.5)[0],
                               0.5 * base * tensors["i.weight"][None, :])
    torch.testing.assert_close(delta_weight(modules["o"], base)[0], base * tensors["o.weight"][:, None])
    d_weight, d_bias = delta_weight(modules["f"], base, 0.5)
    torch.testing.assert_close(d_weight, 0.5 * tensors["f.diff"])
    torch.testing.assert_close(d_bias, 0.5 * tensors["f.diff_b"])
    d_weight, d_bias = delta_weight(modules["n"], torch.ones(6), 2.0)
    torch.testing.assert_close(d_bias, 2.0 * tensors["n.b_norm"])
    d_weight, d_bias = delta_weight(modules["b"], base)
    assert not d_weight.any()
    torch.testing.assert_close(d_bias, tensors["b.diff_b"])


def test_bias_deltas_beside_a_lora():
    """Flux control LoRAs carry `lora_B.bias`, some trainers `diff_b`: both add to the
    bias with the strength and no alpha scaling (ComfyUI's "diff" patch)."""
    bias = rand(6, seed=8)
    for bias_key in ("m.lora_B.bias", "m.diff_b"):
        module = parse_lora({"m.lora_B.weight": UP, "m.lora_A.weight": DOWN, bias_key: bias,
                             "m.alpha": torch.tensor(2.0)}).modules["m"]
        d_weight, d_bias = delta_weight(module, None, 0.5)
        torch.testing.assert_close(d_weight, 0.25 * UP @ DOWN)
        torch.testing.assert_close(d_bias, 0.5 * bias)


def comfyui_glora(a1, a2, b1, b2, alpha, weight):
    """ComfyUI weight_adapter/glora.py: layout by shapes, old layout if a2 matches W."""
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
        if not (old and a2.shape[0] == weight.shape[0] == weight.shape[1]):
            old = False
    rank = a1.shape[0] if old else a2.shape[0]
    if old:
        diff = b2 @ b1 + weight @ a2 @ a1
    else:
        diff = weight @ a1 @ a2 + b1 @ b2
    return diff * alpha / rank


@pytest.mark.parametrize("layout, out_dim", [("new", 6), ("old", 6), ("new", 5), ("old", 5)])
def test_glora_layouts_follow_comfyui(layout, out_dim):
    in_dim, rank = 5, 2
    base = rand(out_dim, in_dim, seed=1)
    if layout == "new":
        shapes = dict(a1=(in_dim, rank), a2=(rank, in_dim), b1=(out_dim, rank), b2=(rank, in_dim))
    else:
        shapes = dict(a1=(rank, in_dim), a2=(in_dim, rank), b1=(rank, in_dim), b2=(out_dim, rank))
    factors = {k: rand(*s, seed=i + 2) for i, (k, s) in enumerate(shapes.items())}
    tensors = {f"g.{k}.weight": v for k, v in factors.items()} | {"g.alpha": torch.tensor(3.0)}
    module = parse_lora(tensors).modules["g"]
    assert needs_base_weight(module)
    expected = comfyui_glora(**factors, alpha=3.0, weight=base)
    torch.testing.assert_close(delta_weight(module, base, 0.5)[0], 0.5 * expected)


def kohya_oft(blocks, alpha, weight, multiplier):
    """kohya networks/oft.py: constraint alpha*out_dim, clamp, Cayley, R^T per block."""
    count, size, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * weight.shape[0]) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(size).unsqueeze(0).repeat(count, 1, 1)
    r = multiplier * (torch.matmul(eye + q, (eye - q).float().inverse()) - eye) + eye
    rotated = torch.einsum("k n m, k n p -> k m p", r, weight.reshape(count, size, -1))
    return rotated.reshape(weight.shape)


@pytest.mark.parametrize("how", ["metadata", "prefix"])
def test_kohya_oft_constraint_semantics(how):
    blocks = rand(4, 3, 3, seed=1) * 0.5
    base = rand(12, 7, seed=2)
    name = "oft_unet_a" if how == "prefix" else "lora_unet_a"
    metadata = {"ss_network_module": "networks.oft"} if how == "metadata" else {}
    module = parse_lora({f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(0.01)},
                        metadata).modules[name]
    assert module.extra["oft_constraint"] == "kohya"
    expected = kohya_oft(blocks, 0.01, base, 0.7) - base
    torch.testing.assert_close(delta_weight(module, base, 0.7)[0], expected, rtol=1e-5, atol=1e-6)
    lycoris_read = parse_lora({"x.oft_blocks": blocks, "x.alpha": torch.tensor(0.0)}).modules["x"]
    assert lycoris_read.extra["oft_constraint"] == "lycoris"
    assert not torch.allclose(delta_weight(lycoris_read, base)[0], kohya_oft(blocks, 0.0, base, 1) - base)


def test_stored_rotations_apply_as_given():
    """Old LyCORIS `oft_diag` stores the rotations themselves (A1111 reads them so)."""
    q = rand(2, 3, 3, seed=1)
    rotations = torch.linalg.matrix_exp(q - q.transpose(1, 2))
    base = rand(6, 4, seed=2)
    module = parse_lora({"o.oft_diag": rotations}).modules["o"]
    rotated = torch.einsum("k n m, k n p -> k m p", rotations, base.reshape(2, 3, 4)).reshape(6, 4)
    torch.testing.assert_close(delta_weight(module, base)[0], rotated - base, rtol=1e-5, atol=1e-6)


def test_dora_input_axis_and_comfyui_strength():
    up, down = rand(6, 2, seed=1), rand(2, 5, seed=2)
    base = rand(6, 5, seed=3)
    magnitude = rand(1, 5, seed=4).abs() + 0.5
    module = parse_lora({"d.lora_up.weight": up, "d.lora_down.weight": down,
                         "d.dora_scale": magnitude}).modules["d"]
    merged = base + up @ down
    target = magnitude * merged / merged.norm(dim=0, keepdim=True)
    torch.testing.assert_close(delta_weight(module, base, 0.3)[0], 0.3 * (target - base))
    with pytest.raises(SdkitError, match="d: a lora delta needs the base weight"):
        delta_weight(module, None)


def test_only_scalars_are_read_while_parsing():
    tensors = {"m.lora_up.weight": UP, "m.lora_down.weight": DOWN, "m.alpha": torch.tensor(4.0),
               "i.weight": rand(5), "i.on_input": torch.tensor(1)}
    loaded = []

    def load(key: str) -> torch.Tensor:
        loaded.append(key)
        return tensors[key]

    infos = {k: TensorInfo(k, "F32", tuple(v.shape)) for k, v in tensors.items()}
    model = ModelFile(Path("x.safetensors"), "safetensors", infos, {"ss_network_dim": "4"},
                      _loader=load)
    parsed = parse_lora(model)
    assert sorted(loaded) == ["i.on_input", "m.alpha"]
    assert parsed.metadata == {"ss_network_dim": "4"}
    up = parsed.modules["m"].tensors["up"]
    assert isinstance(up, LazyTensor) and (up.dtype, up.shape) == ("F32", (6, 4))
    torch.testing.assert_close(up.load(), UP)


def test_unusable_keys_are_reported_with_reasons():
    tensors = {"ok.lora_up.weight": UP, "ok.lora_down.weight": DOWN,
               "half.lora_up.weight": UP,
               "mixed.lora_up.weight": UP, "mixed.lora_down.weight": DOWN, "mixed.hada_w1_a": UP,
               "lonely.alpha": torch.tensor(1.0),
               "bad_rank.lora_up.weight": UP, "bad_rank.lora_down.weight": rand(3, 5),
               "conv_in.weight": rand(4, 4), "emb_params": rand(2, 8),
               "o.oft_blocks": rand(4, 4), "meta": "not a tensor"}
    parsed = parse_lora(tensors)
    assert list(parsed.modules) == ["ok"]
    reasons = parsed.unrecognised
    assert reasons["half.lora_up.weight"] == "lora module without down"
    assert reasons["mixed.hada_w1_a"] == "mixes loha and lora tensors"
    assert reasons["lonely.alpha"].startswith("no adapter weights")
    assert "do not share a rank" in reasons["bad_rank.lora_down.weight"]
    assert reasons["conv_in.weight"].startswith("a plain layer weight")
    assert reasons["emb_params"] == "unknown key suffix"
    assert "not square blocks" in reasons["o.oft_blocks"]
    assert reasons["meta"] == "not a tensor"


def test_a_file_without_adapters_is_refused():
    model = model_from_tensors({"model.diffusion_model.conv_in.bias": torch.zeros(4)}, "ckpt.safetensors")
    with pytest.raises(SdkitError, match=r"^ckpt.safetensors: no LoRA/LyCORIS module found"):
        parse_lora(model)


def test_delta_that_does_not_fit_the_base_weight_is_refused():
    module = parse_lora({"m.lora_up.weight": UP, "m.lora_down.weight": DOWN}).modules["m"]
    torch.testing.assert_close(delta_weight(module, torch.zeros(6, 5, 1, 1))[0],
                               (UP @ DOWN).reshape(6, 5, 1, 1))
    with pytest.raises(SdkitError, match=r"m: the lora delta has shape \[6, 5\], the base weight \[6, 6\]"):
        delta_weight(module, torch.zeros(6, 6))


@pytest.mark.parametrize("names, style", [
    (["lora_unet_a", "lora_te1_b"], "kohya"), (["lycoris_a"], "lycoris"),
    (["unet.a.b", "text_encoder.c"], "diffusers"), (["base_model.model.a.b"], "peft"),
    (["lora_unet_a", "unet.a"], "mixed")])
def test_prefix_style(names, style):
    tensors = {}
    for name in names:
        tensors |= {f"{name}.lora_up.weight": UP, f"{name}.lora_down.weight": DOWN}
    assert parse_lora(tensors).prefix_style == style


def test_peft_config_in_metadata_prefixed_per_component():
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"q": 2},
              "text_encoder.r": 4, "text_encoder.lora_alpha": 1, "text_encoder.use_rslora": True}
    tensors = {}
    for name in ("unet.a.q", "unet.a.k", "text_encoder.q"):
        tensors |= {f"{name}.lora_B.weight": UP, f"{name}.lora_A.weight": DOWN}
    modules = parse_lora(tensors, {"lora_adapter_metadata": json.dumps(config)}).modules
    assert [modules[n].scale for n in ("unet.a.q", "unet.a.k", "text_encoder.q")] == [0.5, 2.0, 0.5]


def test_split_key():
    assert split_key("a.b.lora_A.default.weight") == ("a.b", "lora", "down")
    assert split_key("x.hada_w1_a.default") == ("x", "loha", "w1a")
    assert split_key("x.lora_magnitude_vector.default.weight") == ("x", "common", "magnitude")
    assert split_key("alpha") is None
