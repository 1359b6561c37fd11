"""Measure a denoiser (UNet, SD3 MMDiT, Flux transformer) from its key names and shapes.

Both conventions are read: LDM/sgm names (`input_blocks.*`, `joint_blocks.*`,
`double_blocks.*`) and diffusers names (`down_blocks.*`, `transformer_blocks.*`,
`single_transformer_blocks.*`). What is measured mirrors ComfyUI `model_detection.py`
(`detect_unet_config`) and InvokeAI's main-model probe: input channels and base width from the
first conv, context width from any cross-attention `to_k`, ADM width from `label_emb` /
`add_embedding`, levels from the downsamplers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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

    def to_facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def probe_denoiser(view: KeyView) -> DenoiserFacts | None:
    """Facts of the denoiser in `view`, or None when the keys are not a known denoiser."""
    if view.has_prefix("joint_blocks."):
        return _mmdit_sgm(view)
    if view.has_prefix("double_blocks."):
        return _flux_bfl(view)
    if view.has_prefix("single_transformer_blocks."):
        return _flux_diffusers(view)
    if view.has("pos_embed.proj.weight") and view.has_prefix("transformer_blocks."):
        return _mmdit_diffusers(view)
    if _is_conv(view, "input_blocks.0.0.weight"):
        return _unet_ldm(view)
    diffusers_unet = view.has_prefix("down_blocks.") and view.has_prefix("time_embedding.")
    if diffusers_unet and _is_conv(view, "conv_in.weight"):
        return _unet_diffusers(view)
    return None


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


def _out_in(view: KeyView, key: str) -> tuple[int, int]:
    """(output, input) channels of a patch / input projection; zeros when malformed."""
    shape = view.shape(key) or ()
    return (shape[0], shape[1]) if len(shape) > 1 else (0, 0)


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


def _mmdit_sgm(view: KeyView) -> DenoiserFacts:
    patch = _out_in(view, "x_embedder.proj.weight")
    return DenoiserFacts(
        architecture="mmdit", convention="ldm", in_channels=patch[1], channels=patch[0],
        context_dim=_second_dim(view, "context_embedder.weight"),
        adm_channels=_second_dim(view, "y_embedder.mlp.0.weight"),
        depth=len(view.indices(r"joint_blocks\.(\d+)\.")),
    )


def _mmdit_diffusers(view: KeyView) -> DenoiserFacts:
    patch = _out_in(view, "pos_embed.proj.weight")
    return DenoiserFacts(
        architecture="mmdit", convention="diffusers", in_channels=patch[1], channels=patch[0],
        context_dim=_second_dim(view, "context_embedder.weight"),
        adm_channels=_second_dim(view, "time_text_embed.text_embedder.linear_1.weight"),
        depth=len(view.indices(r"transformer_blocks\.(\d+)\.")),
    )


def _flux_bfl(view: KeyView) -> DenoiserFacts:
    img_in = _out_in(view, "img_in.weight")
    return DenoiserFacts(
        architecture="flux", convention="ldm", in_channels=img_in[1], channels=img_in[0],
        context_dim=_second_dim(view, "txt_in.weight"),
        adm_channels=_second_dim(view, "vector_in.in_layer.weight"),
        depth=len(view.indices(r"double_blocks\.(\d+)\.")),
        guidance_embed=view.has_prefix("guidance_in."),
    )


def _flux_diffusers(view: KeyView) -> DenoiserFacts:
    img_in = _out_in(view, "x_embedder.weight")
    return DenoiserFacts(
        architecture="flux", convention="diffusers", in_channels=img_in[1], channels=img_in[0],
        context_dim=_second_dim(view, "context_embedder.weight"),
        adm_channels=_second_dim(view, "time_text_embed.text_embedder.linear_1.weight"),
        depth=len(view.indices(r"transformer_blocks\.(\d+)\.")),
        guidance_embed=view.has_prefix("time_text_embed.guidance_embedder."),
    )


def unet_variant(facts: DenoiserFacts) -> str:
    """normal | inpaint | pix2pix | depth, from the input channels (A1111 / InvokeAI rule)."""
    if facts.architecture == "flux":
        return "inpaint" if facts.in_channels == 384 else "normal"  # Flux Fill: 64 + 320
    if facts.architecture != "unet":
        return "normal"
    return {9: "inpaint", 8: "pix2pix", 5: "depth"}.get(facts.in_channels, "normal")
