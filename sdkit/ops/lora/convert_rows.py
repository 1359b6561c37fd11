"""One layer's modules rebuilt where the two key conventions arrange its rows differently,
for every algorithm that has an exact rebuilt form (`lora convert` to the single-file
names of kohya and ComfyUI).

Parts → one fused module (q, k, v modules → `qkv`; FLUX's q, k, v and MLP input →
`linear1`); a part the adapter leaves alone adds nothing:

- LoRA: the down factors stacked, the up factor block-diagonal (rank: the parts' summed);
- LoHa: each Hadamard half fused the same way — row i of `(A1 B1) ⊙ (A2 B2)` takes only
  row i of A1 and A2, so block-diagonal A's and stacked B's give each part its product;
- DoRA with its magnitude per output row (LyCORIS' default, peft): the LoRA fused as
  above and the magnitudes stacked — each row is renormalised by its own norm, as in the
  part. Every part must be there: the fused module would renormalise a missing part's
  rows too, to magnitudes the adapter does not hold;
- IA3 on output rows: the gains stacked (zero for a missing part); on input columns: one
  gain vector, when every part holds the same;
- full differences: stacked;
- OFT whose every part's rotation is inside its norm bound (or unbounded): the blocks in
  row order (identity blocks for a missing part), the largest alpha;
- any other mix whose delta does not depend on the base weight (LoKr, a Tucker core,
  parts of different algorithms): the parts' deltas stacked into one full difference —
  exact, as large as the layer itself.

Refused, naming the module: a DoRA whose norm is taken per input column (the fused
layer's norm would run over every part's rows, the part's ran over its own), OFT a norm
bound holds in (one bound covers all the fused blocks together), and GLoRA (one input
transform per module).

A layer stored with its two halves exchanged (FLUX's final modulation): the factors whose
rows are the delta's rows get their halves exchanged (LoRA up, LoHa w1a / w2a, a full
difference, output gains, a per-row DoRA magnitude, OFT blocks when a half is whole
blocks); a per-column DoRA magnitude and input gains stay, since a norm over a column does
not depend on the order of its rows; LoKr becomes a full difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdkit.adapters.lora_format import FULL, IA3, LOHA, LOKR, LORA, OFT, LoraModule
from sdkit.adapters.lora_math import (
    delta_weight,
    needs_base_weight,
    oft_constraint_factor,
)
from sdkit.adapters.lora_names import delta_extent
from sdkit.errors import SdkitError, with_article

if TYPE_CHECKING:
    import torch

# the factor pairs (rows side, rank side) whose product gives rows of the delta
_PAIRS = {LORA: (("up", "down"),), LOHA: (("w1a", "w1b"), ("w2a", "w2b"))}
_KOHYA_KEYS = {"up": "lora_up.weight", "down": "lora_down.weight", "w1a": "hada_w1_a", "w1b": "hada_w1_b",
               "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
_OFT_KEYS = {"blocks": "oft_blocks", "rotation": "oft_diag"}
# the roles whose rows are the delta's rows (exchanged with the halves of a swapped layer)
_ROW_ROLES = {LORA: ("up",), LOHA: ("w1a", "w2a"), FULL: ("diff",)}


@dataclass
class RebuiltModule:
    """A module's tensors by their kohya key suffix (`alpha` included), and what it is."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    form: str = LORA


def module_rows(module: LoraModule) -> int | None:
    """The rows of the module's delta (None: any, for gains on input columns)."""
    if module.type == IA3:
        return None if module.extra.get("on_input") else math.prod(module.tensors["weight"].shape)
    return delta_extent(module)[0]


# ---- parts → one fused module ------------------------------------------------------------------

def fused_module(members: dict[int, LoraModule], rows: Sequence[int | None], layer: str) -> RebuiltModule:
    """The modules on parts of a fused layer (by part index; `rows`: every part's rows,
    None for a part whose module's delta has no rows of its own: gains on input columns)
    as one module on the whole layer."""
    modules = list(members.values())
    first = modules[0]
    weighted = [module for module in modules if needs_base_weight(module)]
    if weighted:
        return _fused_weighted(members, rows, layer, weighted)
    types = {module.type for module in modules}
    if types == {LORA} and all("mid" not in m.tensors for m in modules) or \
            types == {LOHA} and all("t1" not in m.tensors for m in modules):
        rebuilt = _fused_factors(members, rows, first.type)
    elif types == {FULL} and all("diff" in m.tensors for m in modules):
        rebuilt = RebuiltModule({"diff": _stacked(members, rows, lambda m: m.tensors["diff"].load())}, FULL)
    else:
        rebuilt = RebuiltModule({"diff": _stacked(members, rows, _delta_rows)}, FULL)
    _add_bias(rebuilt, members, rows)
    return rebuilt


def _fused_weighted(members: dict[int, LoraModule], rows: Sequence[int | None], layer: str,
                    weighted: list[LoraModule]) -> RebuiltModule:
    """DoRA and IA3 parts, where an exact fused form exists."""
    modules = list(members.values())
    example = weighted[0]
    if all(m.type == IA3 for m in modules):
        rebuilt = _fused_ia3(members, rows, layer)
    elif all(m.dora_scale is not None and m.type == LORA and "mid" not in m.tensors for m in modules):
        if len(members) != len(rows):
            raise SdkitError(f"{example.name}: DoRA on some parts of {layer} only has no fused form (the fused "
                             "module would renormalise the other parts' rows too)")
        column = next((m for m in modules if not dora_on_rows(m)), None)
        if column is not None:
            raise SdkitError(f"{column.name}: its DoRA norm runs over input columns of this part alone, the fused "
                             f"{layer} would take it over every part's rows; no exact fused form (a bake applies "
                             "it exactly)")
        rebuilt = _fused_factors(members, rows, LORA)
        rebuilt.tensors["dora_scale"] = _stacked(members, rows, lambda m: m.dora_scale.load().reshape(-1, 1))
    elif all(m.type == OFT for m in modules):
        rebuilt = _fused_oft(members, rows, layer)
    else:
        problem = f"{with_article(example.type)} delta depends on the whole layer's weight"
        raise SdkitError(f"{example.name}: {problem}; its part of {layer} has no fused form "
                         "(a bake applies it exactly)")
    _add_bias(rebuilt, members, rows)
    return rebuilt


def _fused_oft(members: dict[int, LoraModule], rows: Sequence[int | None], layer: str) -> RebuiltModule:
    """OFT parts as one module: their blocks in row order (a missing part: identity
    blocks), rescales stacked. Exact where every part's rotation is inside its norm bound
    (or unbounded): the fused bound, the largest alpha over all rows, then holds all the
    blocks together too (‖Q‖ ≤ Σ‖Q_i‖ ≤ Σ alpha_i · rows_i)."""
    import torch

    modules = list(members.values())
    roles = {"blocks" if "blocks" in m.tensors else "rotation" for m in modules}
    sizes = {m.tensors[next(iter(roles))].shape[-1] for m in modules}
    styles = {m.extra.get("oft_constraint") for m in modules}
    bounded = [m for part, m in members.items() if oft_constraint_factor(m, rows[part]) != 1.0]
    if len(roles) != 1 or len(sizes) != 1 or len(styles) != 1 or bounded \
            or any(count % next(iter(sizes)) for count in rows):
        example = bounded[0] if bounded else modules[0]
        raise SdkitError(f"{example.name}: OFT parts of {layer} fuse only with one block size and every part's "
                         "rotation inside its norm bound (one bound covers all the fused blocks); a bake applies "
                         "it exactly")
    role, size = roles.pop(), sizes.pop()
    dtype = modules[0].tensors[role].dtype

    def identity(count: int) -> torch.Tensor:
        eye = torch.eye(size) if role == "rotation" else torch.zeros(size, size)
        return eye.expand(count // size, size, size).to(_torch_dtype(dtype))

    blocks = [members[part].tensors[role].load() if part in members else identity(count)
              for part, count in enumerate(rows)]
    rebuilt = RebuiltModule({_OFT_KEYS[role]: torch.cat(blocks)}, OFT)
    if any("rescale" in m.tensors for m in modules):
        rebuilt.tensors["rescale"] = torch.cat([
            members[part].tensors["rescale"].load().reshape(count, -1) if part in members and
            "rescale" in members[part].tensors else torch.ones(count, 1, dtype=_torch_dtype(dtype))
            for part, count in enumerate(rows)])
    alphas = [m.alpha or 0.0 for m in modules]
    unbounded = styles == {"lycoris"} and min(alphas) <= 0
    rebuilt.tensors["alpha"] = torch.tensor(0.0 if unbounded else max(alphas))
    return rebuilt


def dora_on_rows(module: LoraModule) -> bool:
    """Whether a DoRA magnitude is per output row (peft's, or one value per delta row)."""
    magnitude = module.dora_scale
    rows = delta_extent(module)[0]
    return module.extra.get("dora_axis") == "out" or (
        len(magnitude.shape) > 0 and magnitude.shape[0] == rows and math.prod(magnitude.shape) == rows)


def _fused_factors(members: dict[int, LoraModule], rows: Sequence[int | None], form: str) -> RebuiltModule:
    """LoRA / LoHa parts as one module: per factor pair, the rows side block-diagonal and
    the rank side stacked; one common scale kept as alpha, differing scales folded in."""
    import torch

    modules = list(members.values())
    scales = {module.scale for module in modules}
    common = scales.pop() if len(scales) == 1 else None
    rebuilt = RebuiltModule(form=form)
    for index, (row_role, rank_role) in enumerate(_PAIRS[form]):
        ups, downs = [], []
        for part in range(len(rows)):
            module = members.get(part)
            if module is None:
                ups.append(torch.zeros(rows[part], 0, dtype=_torch_dtype(modules[0].tensors[row_role].dtype)))
                continue
            up = module.tensors[row_role].load()
            if common is None and index == 0:  # the scale multiplies the product once
                up = (up.float() * module.scale).to(up.dtype)
            ups.append(up)
            downs.append(module.tensors[rank_role].load())
        rebuilt.tensors[_KOHYA_KEYS[row_role]] = torch.block_diag(*ups)
        rebuilt.tensors[_KOHYA_KEYS[rank_role]] = torch.cat(downs)
    rank = rebuilt.tensors[_KOHYA_KEYS[_PAIRS[form][0][1]]].shape[0]
    rebuilt.tensors["alpha"] = torch.tensor(float((common if common is not None else 1.0) * rank))
    return rebuilt


def _fused_ia3(members: dict[int, LoraModule], rows: Sequence[int | None], layer: str) -> RebuiltModule:
    import torch

    modules = list(members.values())
    on_input = {bool(m.extra.get("on_input")) for m in modules}
    if on_input == {False}:
        gains = _stacked(members, rows, lambda m: m.tensors["weight"].load().reshape(-1, 1)).flatten()
        return RebuiltModule({"weight": gains, "on_input": torch.tensor(0)}, IA3)
    values = [m.tensors["weight"].load() for m in modules]
    if on_input != {True} or len(members) != len(rows) or any(not torch.equal(values[0], v) for v in values[1:]):
        raise SdkitError(f"{modules[0].name}: IA3 gains on the input columns of {layer} differ between its parts "
                         "(or some parts have none); one fused module holds one set")
    return RebuiltModule({"weight": values[0], "on_input": torch.tensor(1)}, IA3)


def _stacked(members: dict[int, LoraModule], rows: Sequence[int | None],
             rows_of: Callable[[LoraModule], torch.Tensor]) -> torch.Tensor:
    """Each part's rows (`rows_of(module)`, a (rows, ...) tensor), zeros for a part the
    adapter leaves alone."""
    import torch

    blocks = {part: rows_of(module) for part, module in members.items()}
    example = next(iter(blocks.values()))
    return torch.cat([blocks[part].reshape(rows[part], *example.shape[1:]) if part in blocks
                      else torch.zeros(rows[part], *example.shape[1:], dtype=example.dtype)
                      for part in range(len(rows))])


def _delta_rows(module: LoraModule) -> torch.Tensor:
    """The module's delta as (rows, columns), in its factors' dtype."""
    delta, _ = delta_weight(module, None, 1.0)
    dtype = next(iter(module.tensors.values())).dtype
    return delta.reshape(delta.shape[0], -1).to(_torch_dtype(dtype))


def _torch_dtype(code: str) -> torch.dtype:
    from sdkit.io.dtypes import CODE_TO_TORCH

    return CODE_TO_TORCH[code]


def _add_bias(rebuilt: RebuiltModule, members: dict[int, LoraModule], rows: Sequence[int | None]) -> None:
    with_bias = {part: module for part, module in members.items() if "bias" in module.tensors}
    if with_bias:
        rebuilt.tensors["diff_b"] = _stacked(with_bias, rows, lambda m: m.tensors["bias"].load().reshape(-1, 1)).flatten()


# ---- a layer stored with its halves exchanged --------------------------------------------------

def swapped_roles(module: LoraModule) -> dict[str, torch.Tensor] | None:
    """The module's tensors that change (by role, `dora_scale` included) when its layer's
    two halves of rows are exchanged; None where only a full difference holds it (LoKr)."""
    if module.type == LOKR and module.dora_scale is None:
        return None
    roles = _swapped_role_names(module)
    swapped = {role: swap_halves(module.tensors[role].load()) for role in roles}
    if "bias" in module.tensors:
        swapped["bias"] = swap_halves(module.tensors["bias"].load())
    if module.dora_scale is not None and dora_on_rows(module):
        swapped["dora_scale"] = swap_halves(module.dora_scale.load())
    return swapped


def _swapped_role_names(module: LoraModule) -> tuple[str, ...]:
    if module.type in _ROW_ROLES and "t1" not in module.tensors and "mid" not in module.tensors:
        return _ROW_ROLES[module.type]
    if module.type == IA3:
        return () if module.extra.get("on_input") else ("weight",)
    if module.type == OFT:
        stored = "blocks" if "blocks" in module.tensors else "rotation"
        count = module.tensors[stored].shape[0]
        if count % 2 == 0:  # each half is whole blocks: the blocks trade places
            return (stored, "rescale") if "rescale" in module.tensors else (stored,)
    raise SdkitError(f"{module.name}: {with_article(module.type)} module on a layer stored in the other row order "
                     "has no exact form there")


def swapped_difference(module: LoraModule) -> dict[str, torch.Tensor]:
    """A module as a full difference with its halves exchanged (kohya key suffixes)."""
    tensors = {"diff": swap_halves(_delta_rows(module))}
    if "bias" in module.tensors:
        tensors["diff_b"] = swap_halves(module.tensors["bias"].load())
    return tensors


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])
