"""Measure a denoiser (UNet, SD3 MMDiT, Flux transformer) from its key names and shapes.

UNets are read in both conventions here: LDM names (`input_blocks.*`) and diffusers names
(`down_blocks.*`), as ComfyUI `model_detection.py` (`detect_unet_config`) and InvokeAI's
main-model probe do: input channels and base width from the first conv, context width
from any cross-attention `to_k`, ADM width from `label_emb` / `add_embedding`, levels from
the downsamplers. Transformers are matched against the layouts their family modules
declare (`sdkit.arch.fingerprint`), in every convention those list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sdkit.arch.fingerprint import LayoutMatch, match_transformers
from sdkit.arch.keyview import KeyView


@dataclass
class DenoiserFacts:
    architecture: str  # "unet" | "mmdit" | "flux"
    convention: str  # "ldm" | "diffusers"
    in_channels: int
    channels: int  # UNet model_channels or transformer hidden size
    context_dim: int | None
    adm_channels: int | None = None
    levels: int | None = None
    depth: int | None = None  # transformer blocks (MMDiT / Flux double blocks)
    linear_projection: bool | None = None  # transformer proj_in is Linear (SD2/SDXL) not 1x1 conv
    encoder_hid_dim: int | None = None  # Kolors ChatGLM projection input
    guidance_embed: bool = False  # Flux dev (guidance-distilled)
    family: str | None = None  # transformers: the family whose layout the keys match
    dims: dict[str, int] | None = None  # transformers: the layout's measured sizes and counts
    flags: dict[str, bool] | None = None  # transformers: the layout's flags
    marker: str | None = None  # transformers: the key prefix that named the layout

    def to_facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def probe_denoiser(view: KeyView) -> DenoiserFacts | None:
    """Facts of the denoiser in `view`, or None when the keys are not a known denoiser."""
    found = probe_denoisers(view)
    return found[0] if found else None


def probe_denoisers(view: KeyView) -> list[DenoiserFacts]:
    """Every known denoiser design under `view`, transformers first: a sound file holds
    one, a file that mixes two models holds more."""
    found = [_transformer_facts(match) for match in match_transformers(view)]
    if _is_conv(view, "input_blocks.0.0.weight"):
        found.append(_unet_ldm(view))
    elif view.has_prefix("down_blocks.") and view.has_prefix("time_embedding.") and _is_conv(view, "conv_in.weight"):
        found.append(_unet_diffusers(view))
    return found


def _is_conv(view: KeyView, key: str) -> bool:
    shape = view.shape(key)
    return shape is not None and len(shape) == 4


def _context_dim(view: KeyView) -> int | None:
    key = view.first_ending("attn2.to_k.weight")
    return _second_dim(view, key) if key else None


def _linear_projection(view: KeyView) -> bool | None:
    shape = view.shape_ending("proj_in.weight")
    return len(shape) == 2 if shape else None


def _second_dim(view: KeyView, key: str) -> int | None:
    shape = view.shape(key)
    return shape[1] if shape and len(shape) > 1 else None


def _unet_ldm(view: KeyView) -> DenoiserFacts:
    conv_in = view.shape("input_blocks.0.0.weight")
    downsamplers = view.indices(r"input_blocks\.(\d+)\.0\.op\.weight")
    return DenoiserFacts(
        architecture="unet", convention="ldm", in_channels=conv_in[1], channels=conv_in[0],
        context_dim=_context_dim(view), adm_channels=_second_dim(view, "label_emb.0.0.weight"),
        levels=len(downsamplers) + 1, linear_projection=_linear_projection(view),
        encoder_hid_dim=_second_dim(view, "encoder_hid_proj.weight"),
    )


def _unet_diffusers(view: KeyView) -> DenoiserFacts:
    conv_in = view.shape("conv_in.weight")
    adm = _second_dim(view, "add_embedding.linear_1.weight") or _second_dim(
        view, "class_embedding.linear_1.weight")
    return DenoiserFacts(
        architecture="unet", convention="diffusers", in_channels=conv_in[1], channels=conv_in[0],
        context_dim=_context_dim(view), adm_channels=adm,
        levels=len(view.indices(r"down_blocks\.(\d+)\.")), linear_projection=_linear_projection(view),
        encoder_hid_dim=_second_dim(view, "encoder_hid_proj.weight"),
    )


def _transformer_facts(match: LayoutMatch) -> DenoiserFacts:
    dims, counts = match.dims, list(match.layout.counts)
    return DenoiserFacts(
        architecture=match.family.denoiser, convention=match.layout.convention,
        in_channels=dims.get("in_channels", 0), channels=dims.get("hidden", 0),
        context_dim=dims.get("context"), adm_channels=dims.get("pooled"),
        depth=dims.get(counts[0]) if counts else None,
        guidance_embed=match.flags.get("guidance", False),
        family=match.family.name, dims=dict(dims), flags=dict(match.flags), marker=match.marker,
    )


def unet_variant(facts: DenoiserFacts) -> str:
    """normal | inpaint | pix2pix | depth of a UNet, from the input channels (A1111 /
    InvokeAI rule); a transformer's variant comes from its release (`fingerprint`)."""
    if facts.architecture != "unet":
        return "normal"
    return {9: "inpaint", 8: "pix2pix", 5: "depth"}.get(facts.in_channels, "normal")
