"""Text encoders: transformers `CLIPTextModel[WithProjection]` ⇄ the two LDM spellings.

Diffusers side (what transformers 5 `state_dict()` holds): `CLIPTextModel` keys have no
`text_model.` level, `CLIPTextModelWithProjection` keys have it (plus `text_projection.weight`
beside it); position ids are not stored. Both spellings, and stored position ids, are
accepted as input.

LDM style "hf" (SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`):
the same names under `text_model.` (files without that level are accepted), with the
`text_model.embeddings.position_ids` row that community files carry (made again when the
diffusers input lacks it).

LDM style "openclip" (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`):
`token_embedding.weight`, `positional_embedding`, `ln_final`, `text_projection` (the
transpose of the diffusers Linear weight) and `transformer.resblocks.{n}` with `ln_1/ln_2`,
`mlp.c_fc/c_proj`, `attn.out_proj` and `attn.in_proj_weight/bias` = q, k, v concatenated.

No place on the diffusers side (left out when converting to it): OpenCLIP's `logit_scale`,
the LDM position ids, layers beyond the config's `num_hidden_layers` (SD2's diffusers text
encoder stops one layer early because SD2 reads the penultimate layer), and
`text_projection` when the config's class has none.

Written files (`text_encoder/model.safetensors`) hold every weight under `text_model.`,
the projection beside it (`stored_clip_names`): the layout transformers 4 saves and reads,
transformers 5 reads (it drops the level on load) and ComfyUI's CLIP loader looks for
(it tells CLIP-L / -H / -G apart by `text_model.encoder.layers.N.mlp.fc1.weight`). The
level-less names transformers 5 saves are silently dropped by ComfyUI's diffusers loader.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from sdkit.arch.keymaps.recipe import KeyPlan, KeyRules, Link, plan_from_keys, plan_from_links
from sdkit.errors import SdkitError

STYLES = ("hf", "openclip")
_WRAP = "text_model."
_HF_LAYER_LEAVES = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
_OPENCLIP_LAYER_LEAVES = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                          ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("layer_norm2", "ln_2"))
_LAYER_INDEX = {"hf": re.compile(r"^text_model\.encoder\.layers\.(\d+)\."),
                "openclip": re.compile(r"^transformer\.resblocks\.(\d+)\.")}
_LDM_PROJECTION = {"hf": "text_projection.weight", "openclip": "text_projection"}
_NOT_ON_DIFFUSERS_SIDE = ("logit_scale",)


def has_projection(config: Mapping[str, Any], keys: Iterable[str] = ()) -> bool:
    """Whether the diffusers model is a `CLIPTextModelWithProjection`.

    The config's `architectures` decides; without it, whether the keys hold a projection.
    """
    architectures = config.get("architectures") or ()
    if "CLIPTextModelWithProjection" in architectures:
        return True
    if "CLIPTextModel" in architectures:
        return False
    return any(key.endswith(("text_projection", "text_projection.weight")) for key in keys)


def stored_clip_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers-side text encoder's tensors named as its weight file stores them: every
    key under `text_model.` except `text_projection.weight` (both spellings accepted)."""
    return {key if key == "text_projection.weight" or key.startswith(_WRAP) else _WRAP + key: value
            for key, value in tensors.items()}


class _ClipNames:
    """Diffusers-side names for a model with or without the `text_model.` level."""

    def __init__(self, projection: bool) -> None:
        self.projection = projection
        self.wrap = _WRAP if projection else ""

    def diffusers(self, flat: str) -> str:
        return flat if flat == "text_projection.weight" else self.wrap + flat

    def canonical(self, key: str) -> str:
        return self.diffusers(key.removeprefix(_WRAP))


def _check(config: Mapping[str, Any], style: str) -> tuple[int, int]:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    layers = config.get("num_hidden_layers", 12)
    positions = config.get("max_position_embeddings", 77)
    if not isinstance(layers, int) or not isinstance(positions, int):
        raise SdkitError("text encoder config: num_hidden_layers and max_position_embeddings must be numbers")
    return layers, positions


def clip_links(config: Mapping[str, Any], style: str, projection: bool) -> list[Link]:
    """Every tensor place of the text encoder that `config` describes, in both layouts."""
    layers, positions = _check(config, style)
    names = _ClipNames(projection)
    if style == "hf":
        return _hf_links(names, layers, positions)
    return _openclip_links(names, layers)


def _hf_links(names: _ClipNames, layers: int, positions: int) -> list[Link]:
    flat = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    for n in range(layers):
        flat += [f"encoder.layers.{n}.{leaf}.{p}" for leaf in _HF_LAYER_LEAVES for p in ("weight", "bias")]
    flat += ["final_layer_norm.weight", "final_layer_norm.bias"]
    links = [Link((names.diffusers(key),), (_WRAP + key,)) for key in flat]
    links.append(Link((names.diffusers("embeddings.position_ids"),), (_WRAP + "embeddings.position_ids",),
                      "position_ids", positions))
    if names.projection:
        links.append(Link(("text_projection.weight",), ("text_projection.weight",)))
    return links


def _openclip_links(names: _ClipNames, layers: int) -> list[Link]:
    d = names.diffusers
    links = [Link((d("embeddings.token_embedding.weight"),), ("token_embedding.weight",)),
             Link((d("embeddings.position_embedding.weight"),), ("positional_embedding",))]
    for n in range(layers):
        hf, oc = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            qkv = tuple(d(f"{hf}self_attn.{x}_proj.{p}") for x in "qkv")
            links.append(Link(qkv, (f"{oc}attn.in_proj_{p}",), "fused"))
        for hf_leaf, oc_leaf in _OPENCLIP_LAYER_LEAVES:
            for p in ("weight", "bias"):
                links.append(Link((d(f"{hf}{hf_leaf}.{p}"),), (f"{oc}{oc_leaf}.{p}",)))
    for p in ("weight", "bias"):
        links.append(Link((d(f"final_layer_norm.{p}"),), (f"ln_final.{p}",)))
    if names.projection:  # OpenCLIP computes x @ P, a Linear stores P transposed
        links.append(Link(("text_projection.weight",), ("text_projection",), "transpose"))
    return links


def clip_plan(config: Mapping[str, Any], direction: str, style: str) -> KeyPlan:
    """The plan for every tensor of the text encoder described by `config`.

    `style` names the LDM spelling: "hf" or "openclip".
    """
    return plan_from_links(clip_links(config, style, has_projection(config)), direction)


def clip_plan_for_keys(config: Mapping[str, Any], keys: Iterable[str], direction: str, style: str) -> KeyPlan:
    keys = list(keys)
    projection = has_projection(config, keys)
    links = clip_links(config, style, projection)
    names = _ClipNames(projection)
    if direction == "diffusers_to_ldm":
        position_ids = names.diffusers("embeddings.position_ids")
        rules = KeyRules("text encoder", canonical=names.canonical,
                         droppable=lambda key: style == "openclip" and key == position_ids)
    else:
        rules = KeyRules("text encoder", canonical=_ldm_canonical(style),
                         droppable=_ldm_droppable(style, config.get("num_hidden_layers", 12), projection))
    return plan_from_keys(links, direction, keys, rules)


def _ldm_canonical(style: str):
    if style == "openclip":
        return lambda key: key
    # old files lack the text_model. level; the projection never had it
    return lambda key: key if key.startswith(_WRAP) or key == "text_projection.weight" else _WRAP + key


def _ldm_droppable(style: str, layers: int, projection: bool):
    pattern = _LAYER_INDEX[style]

    def droppable(key: str) -> bool:
        if key in _NOT_ON_DIFFUSERS_SIDE or (key == _LDM_PROJECTION[style] and not projection):
            return True
        match = pattern.match(key)
        return bool(match) and int(match.group(1)) >= layers

    return droppable
