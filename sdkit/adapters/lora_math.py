"""Weight deltas of LoRA-family modules: `W' = W + dW`, in float32.

Each rule follows the reference loaders (LyCORIS forward path, ComfyUI, A1111, kohya):

- lora: `scale * up @ down` (conv factors flattened; `lora_mid` is a Tucker core).
- loha: `scale * (w1a @ w1b) * (w2a @ w2b)`, each half optionally Tucker-rebuilt.
- lokr: `scale * kron(w1, w2)`, halves rebuilt from factors; two full halves: scale 1
  (encoded by the parser as rank None).
- glora: `scale * (W @ a1 @ a2 + b1 @ b2)` (old layout: `b2 @ b1 + W @ a2 @ a1`).
- ia3: `W * w` per input column (`on_input`) or per output row.
- full / norm: the stored difference; `bias` roles add to the bias.
- oft / boft: orthogonal rotations of W's output rows; strength blends each rotation
  with the identity, so `dW = R_m W - W`.
The scale is applied once (LyCORIS' merge path for LoHa/LoKr applies it twice; its
forward path, A1111 and ComfyUI do not). Strength multiplies the delta, except for OFT
(above) and DoRA, where `dW = strength * (W_dora - W)` as ComfyUI interpolates.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from sdkit.adapters.lora_format import (BOFT, FULL, GLORA, IA3, LOHA, LOKR, LORA, NORM,
                                        OFT, LoraModule)
from sdkit.errors import SdkitError, with_article
from sdkit.io.lazy import LazyTensor

_NEEDS_BASE = frozenset({IA3, GLORA, OFT, BOFT})
_EPS = torch.finfo(torch.float32).eps  # LyCORIS adds it to the DoRA norm
PRODUCT_ELEMENTS = 1 << 20  # float32 elements per row chunk of `up @ down` (4 MiB)


def needs_base_weight(module: LoraModule) -> bool:
    """Whether the delta depends on the base weight's values (not just its shape)."""
    return module.type in _NEEDS_BASE or module.dora_scale is not None


def delta_weight(module: LoraModule, base_weight: torch.Tensor | None,
                 strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW, d_bias or None) in float32 so that `W' = W + dW`, `b' = b + d_bias`.

    `base_weight` may be None for types that only need it for its shape; dW then has
    the adapter's own shape.
    """
    weight = None if base_weight is None else base_weight.detach().float()
    if module.type in (OFT, BOFT):
        rotated = _rotate(module, _require(module, weight), strength)
        return rotated - weight, _bias_delta(module, strength)
    delta = _fit(module, _DELTAS[module.type](module, weight), weight)
    if module.dora_scale is not None:
        delta = _dora(module, _require(module, weight), delta) - weight
    return delta * strength, _bias_delta(module, strength)


def _require(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        raise SdkitError(f"{module.name}: {with_article(module.type)} delta needs the base weight")
    return weight


def _f32(module: LoraModule, role: str) -> torch.Tensor:
    return _load(module.tensors[role])


def _load(tensor: LazyTensor) -> torch.Tensor:
    return tensor.load().detach().float()


def _fit(module: LoraModule, delta: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Reshape a delta to the base weight (a linear delta fits a 1x1 conv and back)."""
    if weight is None or delta.shape == weight.shape:
        return delta
    if delta.numel() != weight.numel():
        raise SdkitError(f"{module.name}: the {module.type} delta has shape "
                         f"{list(delta.shape)}, the base weight {list(weight.shape)}")
    return delta.reshape(weight.shape)


def _bias_delta(module: LoraModule, strength: float) -> torch.Tensor | None:
    bias = module.tensors.get("bias")
    return None if bias is None else _load(bias) * strength


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Rebuild (out, in, *k) from a core (r1, r2, *k), up (out, r1), down (r2, in)."""
    return torch.einsum("a b ..., o a, b i -> o i ...", core, up, down)


def _lora_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    up = _f32(module, "up").flatten(1)
    down = _f32(module, "down")
    if "mid" in module.tensors:
        delta = _tucker(_f32(module, "mid"), up, down.flatten(1))
    else:
        delta = lora_product(up, down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return delta * module.scale


def lora_product_chunks(up: torch.Tensor, down: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """`up @ down` as (first row, rows) chunks of at most PRODUCT_ELEMENTS elements.

    A bake consumes the chunks one at a time instead of holding a layer-sized float32
    product. The chunk boundaries depend only on the shapes, and every product is formed
    this way, because a matrix product's bits can depend on how many rows it is given.
    """
    step = max(1, PRODUCT_ELEMENTS // max(1, down.shape[1]))
    for start in range(0, up.shape[0], step):
        yield start, up[start:start + step] @ down


def lora_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`up @ down`, assembled from `lora_product_chunks` (the same bits as a bake)."""
    product = torch.empty(up.shape[0], down.shape[1], dtype=torch.result_type(up, down), device=up.device)
    for start, chunk in lora_product_chunks(up, down):
        product[start:start + chunk.shape[0]] = chunk
    return product


def _loha_half_shape(module: LoraModule, half: str) -> tuple[int, ...]:
    """The shape of `w_a @ w_b` (or its Tucker rebuild), from the factors' shapes."""
    w_a, w_b = module.tensors[f"w{half}a"].shape, module.tensors[f"w{half}b"].shape
    if f"t{half}" in module.tensors:
        return (w_a[-1], w_b[-1], *module.tensors[f"t{half}"].shape[2:])
    if len(w_a) != 2 or len(w_b) != 2 or w_a[1] != w_b[0]:
        raise SdkitError(f"{module.name}: LoHa factors {list(w_a)} and {list(w_b)} do not "
                         "make a matrix product")
    return (w_a[0], w_b[1])


def _loha_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    # the halves are multiplied elementwise: different shapes would broadcast into a
    # product neither half's size (or fail after both were formed)
    shapes = [_loha_half_shape(module, half) for half in ("1", "2")]
    if shapes[0] != shapes[1]:
        raise SdkitError(f"{module.name}: the LoHa halves make {list(shapes[0])} and "
                         f"{list(shapes[1])}, which differ")
    halves = []
    for half in ("1", "2"):
        w_a, w_b = _f32(module, f"w{half}a"), _f32(module, f"w{half}b")
        if f"t{half}" in module.tensors:  # Tucker: w_a is (r, out), w_b is (r, in)
            halves.append(_tucker(_f32(module, f"t{half}"), w_a.T, w_b))
        else:
            halves.append(w_a @ w_b)
    return halves[0] * halves[1] * module.scale


def _lokr_half(module: LoraModule, half: str) -> torch.Tensor:
    if half in module.tensors:
        return _f32(module, half)
    w_a, w_b = _f32(module, f"{half}a"), _f32(module, f"{half}b")
    if half == "w2" and "t2" in module.tensors:  # Tucker: w_a is (r, b), w_b is (r, d)
        return _tucker(_f32(module, "t2"), w_a.T, w_b)
    return w_a @ w_b.flatten(1)


def _lokr_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    w1, w2 = _lokr_half(module, "w1"), _lokr_half(module, "w2")
    # kron of the flattened halves equals kron with w1 broadcast over w2's kernel axes
    # once reshaped to (a*b, c*d, *k); the flat form also covers a flattened w2_b.
    delta = torch.kron(w1, w2.flatten(1))
    if w2.dim() > 2:
        delta = delta.reshape(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return delta * module.scale


def _glora_layout(module: LoraModule, weight: torch.Tensor) -> str:
    layout = module.extra.get("glora_layout")
    if layout:
        return layout
    # Both layouts fit a square layer: old when a2's first dim is the layer's (ComfyUI).
    a2 = module.tensors["a2"].shape
    return "old" if a2[0] == weight.shape[0] == weight.shape[1] else "new"


def _check_glora_size(module: LoraModule, weight: torch.Tensor, layout: str) -> None:
    """The factors must chain into the weight's shape, checked before anything is formed
    (a b1 @ b2 of 50 000 x 50 000 from a few MB of factors would be built to be refused)."""
    shapes = {role: lazy.shape for role, lazy in module.tensors.items()}
    flat = {role: (shape[0], math.prod(shape[1:])) for role, shape in shapes.items()
            if role in ("a1", "a2", "b1", "b2")}
    out, inputs = weight.shape[0], math.prod(weight.shape[1:])
    if layout == "old":  # b2 @ b1 + W @ a2 @ a1, all flattened
        fits = (flat["b2"] == (out, flat["b1"][0]) and flat["b1"][1] == inputs
                and flat["a2"][0] == inputs and flat["a2"][1] == flat["a1"][0]
                and flat["a1"][1] == inputs)
    else:  # W ×₁ a1 ×₁ a2 + b1 @ (bm) @ b2
        channels = weight.shape[1]
        inner = (flat["b1"][1] == flat["b2"][0] if "bm" not in shapes
                 else shapes["bm"][:2] == (flat["b1"][1], flat["b2"][0]))
        kernel = math.prod(shapes["bm"][2:]) if "bm" in shapes else 1
        fits = (flat["a1"][0] == channels and flat["a1"][1] == flat["a2"][0]
                and flat["a2"][1] == channels and inner and flat["b1"][0] == out
                and flat["b2"][1] * kernel == inputs)
    if not fits:
        described = ", ".join(f"{role} {list(shape)}" for role, shape in shapes.items())
        raise SdkitError(f"{module.name}: GLoRA factors ({described}) do not make the base "
                         f"weight's shape {list(weight.shape)}")


def _glora_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    weight = _require(module, weight)
    _check_glora_size(module, weight, _glora_layout(module, weight))
    a1, a2 = _f32(module, "a1").flatten(1), _f32(module, "a2").flatten(1)
    b1, b2 = _f32(module, "b1"), _f32(module, "b2")
    if _glora_layout(module, weight) == "old":
        rank = module.tensors["a1"].shape[0]
        flat = b2.flatten(1) @ b1.flatten(1) + weight.flatten(1) @ a2 @ a1
        return flat.reshape(weight.shape) * module.scale_for_rank(rank)
    rank = module.tensors["a2"].shape[0]
    weight_a = torch.einsum("o i ..., i j -> o j ...", weight, a1)
    weight_a = torch.einsum("o i ..., i j -> o j ...", weight_a, a2)
    if "bm" in module.tensors:
        b_part = _tucker(_f32(module, "bm"), b1.flatten(1), b2.flatten(1))
    else:
        b_part = b1.flatten(1) @ b2.flatten(1)
    return (weight_a + b_part.reshape(weight.shape)) * module.scale_for_rank(rank)


def _ia3_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    weight = _require(module, weight)
    gains = _f32(module, "weight").flatten()
    axis = 1 if module.extra.get("on_input") else 0
    if gains.numel() != weight.shape[axis]:
        raise SdkitError(f"{module.name}: IA3 has {gains.numel()} gains, the base weight "
                         f"{weight.shape[axis]} {'inputs' if axis else 'outputs'}")
    shape = [1] * weight.dim()
    shape[axis] = -1
    return weight * gains.reshape(shape)


def _full_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    if "diff" in module.tensors:
        return _f32(module, "diff")
    return torch.zeros_like(_require(module, weight))  # a bias-only difference


def _norm_delta(module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    if "w_norm" in module.tensors:
        return _f32(module, "w_norm")
    return torch.zeros_like(_require(module, weight))


_DELTAS: dict[str, Callable[[LoraModule, torch.Tensor | None], torch.Tensor]] = {
    LORA: _lora_delta, LOHA: _loha_delta, LOKR: _lokr_delta, GLORA: _glora_delta,
    IA3: _ia3_delta, FULL: _full_delta, NORM: _norm_delta,
}


def _dora(module: LoraModule, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA: the updated weight renormalised to `dora_scale` per output row or per
    input column (LyCORIS default and peft: rows; older LyCORIS: columns)."""
    merged = weight + delta
    magnitude = _load(module.dora_scale)
    on_output = module.extra.get("dora_axis") == "out" or (
        magnitude.dim() > 0 and magnitude.shape[0] == weight.shape[0])
    axis = 0 if on_output else 1
    if magnitude.numel() != weight.shape[axis]:
        raise SdkitError(f"{module.name}: dora_scale {list(magnitude.shape)} fits neither "
                         f"axis of the base weight {list(weight.shape)}")
    moved = merged.movedim(axis, 0)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1) + _EPS
    shape = [1] * weight.dim()
    shape[axis] = -1
    return merged * (magnitude.flatten() / norm).reshape(shape)


def _rotations(module: LoraModule, out_dim: int) -> torch.Tensor:
    """Per-block rotations R (…, b, b): stored directly, or the Cayley transform
    (I + Q)(I - Q)^-1 of the skew part Q of the stored blocks, norm-constrained."""
    if "rotation" in module.tensors:
        return _f32(module, "rotation")
    blocks = _f32(module, "blocks")
    skew = blocks - blocks.transpose(-1, -2)
    skew = skew * _constraint_factor(module, skew.norm(), out_dim)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    # (I + Q) and (I - Q)^-1 commute, so R = (I - Q)^-1 (I + Q) is one solve.
    return torch.linalg.solve(eye - skew, eye + skew)


def oft_constraint_factor(module: LoraModule, out_dim: int) -> float:
    """The factor the norm bound puts on an OFT module's generators over `out_dim` rows
    (1: inside the bound or unbounded; stored rotations have none)."""
    if "rotation" in module.tensors:
        return 1.0
    blocks = _f32(module, "blocks")
    return float(_constraint_factor(module, (blocks - blocks.transpose(-1, -2)).norm(), out_dim))


def _constraint_factor(module: LoraModule, norm: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Both trainers bound ‖Q‖ by alpha * out_dim (ComfyUI's loader drops out_dim; the
    trainers are followed). LyCORIS rescales only when over the bound and treats
    alpha <= 0 as unbounded; kohya always clamps (alpha 0 = identity)."""
    bound = (module.alpha or 0.0) * out_dim
    if module.extra.get("oft_constraint") == "kohya":
        return (torch.clamp(norm, max=bound) + 1e-8) / (norm + 1e-8)
    if bound > 0 and norm + 1e-8 > bound:
        return bound / (norm + 1e-8)
    return torch.ones(())


def _rotate(module: LoraModule, weight: torch.Tensor, strength: float) -> torch.Tensor:
    rotations = _rotations(module, weight.shape[0])
    eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype)
    rotations = strength * (rotations - eye) + eye
    if module.type == BOFT:
        rotated = _butterfly(rotations, weight)
    else:
        rotated = _block_rotate(module, rotations, weight)
    if "rescale" in module.tensors:
        rescale = _f32(module, "rescale").flatten()
        rotated = rotated * rescale.reshape(-1, *[1] * (weight.dim() - 1))
    return rotated


def _block_rotate(module: LoraModule, rotations: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Row block k of W becomes R_k^T W_k (the einsum of LyCORIS and kohya)."""
    count, size = rotations.shape[0], rotations.shape[-1]
    if count * size != weight.shape[0]:
        raise SdkitError(f"{module.name}: {count} OFT blocks of {size} do not cover "
                         f"{weight.shape[0]} output rows")
    blocks = weight.reshape(count, size, *weight.shape[1:])
    return torch.einsum("k n m, k n ... -> k m ...", rotations, blocks).reshape(weight.shape)


def _butterfly(rotations: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BOFT: stage i permutes rows into pairs 2^i * b/2 apart, rotates each block of b
    rows with R_i (R x, not R^T x), and permutes back."""
    size = rotations.shape[-1]
    rows = weight
    for stage, stage_rotations in enumerate(rotations):
        stride = 2 ** stage * (size // 2)
        rows = rows.unflatten(0, (-1, 2, stride)).transpose(1, 2).flatten(0, 2)
        rows = torch.einsum("b i j, b j ... -> b i ...", stage_rotations,
                            rows.unflatten(0, (-1, size)))
        rows = rows.flatten(0, 1).unflatten(0, (-1, stride, 2)).transpose(1, 2).flatten(0, 2)
    return rows
