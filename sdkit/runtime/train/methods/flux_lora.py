"""LoRA and LoKr on FLUX.1's transformer: targets and the files written.

Targets are the layers kohya's `networks/lora_flux.py` adapts by default (every linear
layer inside its `DoubleStreamBlock`s and `SingleStreamBlock`s: img/txt `mod.lin`,
`attn.qkv`, `attn.proj`, `mlp.0`, `mlp.2`; single blocks' `linear1`, `linear2`,
`modulation.lin`), reached by their names in diffusers' `FluxTransformer2DModel`, which
keeps q, k, v and a single block's MLP input apart. That is a superset of diffusers'
`train_dreambooth_lora_flux.py` default (attention and feed-forward of the double blocks);
the final layer and the embedders stay untrained, as in both.

Files:
- LoRA, `--layout kohya` (default): kohya's names (`lora_unet_double_blocks_0_img_attn_qkv`,
  what ComfyUI, Forge and sd-scripts load). A fused single-file layer adapted part by part
  is written as one module whose down factors are stacked and whose up factor is
  block-diagonal, the layout kohya itself saves with `split_qkv=True` (rank 3r for q|k|v,
  4r for q|k|v|mlp); the delta is exactly the trained one. The renaming and fusing is
  `sdkit lora convert`'s (`ops/lora/convert.in_kohya_layout`), checked against the base's
  shapes.
- LoRA, `--layout diffusers`: `transformer.<path>.lora_A/lora_B.weight`, alpha / rank folded
  into lora_B, with `lora_adapter_metadata`, as diffusers' trainer saves.
- LoKr: LyCORIS's names for a wrapped diffusers transformer (`lycoris_transformer_blocks_0_attn_to_q`,
  which ComfyUI maps to the same layers); a Kronecker module cannot be fused, so q, k, v
  stay apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdkit.adapters.lora_export import ExportModule, LoraFacts, Provenance, write_lora
from sdkit.runtime.train.methods.lyco import export_modules

if TYPE_CHECKING:
    from sdkit.runtime.train.methods.base import SaveContext
    from sdkit.runtime.train.methods.lora import NetworkMethod

_DOUBLE = (r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
           r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear")
_SINGLE = r"attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear"
# a regex: peft full-matches it against module paths (a name list would also take the
# final layer's `proj_out`)
FLUX_TARGETS = rf"(transformer_blocks\.\d+\.({_DOUBLE})|single_transformer_blocks\.\d+\.({_SINGLE}))"
_LYCORIS_PREFIX = "lycoris_"


def flux_network_metadata(method: str) -> dict[str, Any]:
    """`ss_network_args` of a FLUX.1 network: kohya's block choice and q/k/v layout."""
    args: dict[str, Any] = {"train_blocks": "all"}
    if method == "lora":
        args["split_qkv"] = "True"
    return args


def write_flux_adapter(method: NetworkMethod, state: Mapping[str, torch.Tensor], context: SaveContext) -> Path:
    options = method.config.network
    modules = export_modules(state, "transformer", options.rank, method.alpha)
    if method.name == "lokr":
        modules = [ExportModule("unet", None, None, m.tensors, m.alpha, _LYCORIS_PREFIX + m.diffusers_path.replace(
            ".", "_")) for m in modules]
    elif options.layout == "kohya":
        modules = kohya_modules(modules, method.config.base)
    facts = LoraFacts(family="flux", prediction="flow", network_module=method.network_metadata()["ss_network_module"],
                      notes={**context.training_metadata, **method.network_metadata()})
    provenance = Provenance("train", tuple(context.inputs), context.recipe_params, context.input_hashes)
    layout = "diffusers" if method.name == "lora" and options.layout == "diffusers" else "kohya"
    return write_lora(context.path, modules, facts, provenance, format=layout, dtype=context.dtype,
                      overwrite=context.overwrite)


def kohya_modules(modules: list[ExportModule], base: Path) -> list[ExportModule]:
    """Plain LoRA modules on diffusers paths, renamed (and q / k / v fused) to kohya's names."""
    from sdkit.adapters.lora_format import parse_lora
    from sdkit.arch import Identity
    from sdkit.ops.lora.convert import in_kohya_layout

    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        rank = module.tensors["lora_down.weight"].shape[0]
        name = f"transformer.{module.diffusers_path}"
        tensors[name + ".lora_A.weight"] = module.tensors["lora_down.weight"]
        tensors[name + ".lora_B.weight"] = module.tensors["lora_up.weight"] * (module.alpha / rank)
    lora = in_kohya_layout(parse_lora(tensors, {}), Identity("lora", family="flux"), str(base))
    renamed = []
    for name, module in sorted(lora.modules.items()):
        factors = {"lora_up.weight": module.tensors["up"].load(), "lora_down.weight": module.tensors["down"].load()}
        renamed.append(ExportModule("unet", None, None, factors, module.alpha, name))
    return renamed
