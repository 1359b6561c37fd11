"""`identify()`: what a model file is, for which family, in which key convention.

Detection reads key names and shapes (header data) and at most a few tiny tensors (LoRA
alphas, CLIP position ids, one LayerNorm bias for the SD2 prediction test, ComfyUI's
per-layer quantization JSON); `deep=True` adds a NaN/Inf scan over every float tensor, one
tensor at a time. A quantized file whose scales are missing or misshapen is refused
(SdkitError); a file that mixes two models is identified as such (`Identity.refusal`).
"""

from __future__ import annotations

from sdkit.arch.auxiliary_detect import identify_auxiliary
from sdkit.arch.describe import describe
from sdkit.arch.families import FAMILIES
from sdkit.arch.embedding_detect import embedding_layout, identify_embedding
from sdkit.arch.hygiene import broken_position_ids, ema_tensor_names, non_finite_tensors
from sdkit.arch.hypernetwork_detect import identify_hypernetwork, is_hypernetwork
from sdkit.arch.identity import Identity, refuse_unusable
from sdkit.arch.lora_detect import identify_lora, is_lora_file, scan_lora
from sdkit.arch.metadata import MetadataHints, metadata_hints, metadata_notes
from sdkit.arch.model_detect import (identify_component_folder, identify_diffusers_folder,
                                     identify_single_file)
from sdkit.arch.quantization import QuantScan, scan_quantization
from sdkit.errors import SdkitError
from sdkit.io.model_file import ModelFile

_LISTED_NAMES = 5  # tensor names quoted in a note before "and N more"


def identify(model: ModelFile, *, deep: bool = False) -> Identity:
    """Identify `model`; never loads more than a few tiny tensors unless `deep`."""
    hints = metadata_hints(model.metadata)
    quantization = QuantScan() if model.components else scan_quantization(model)
    if quantization.problems:
        more = len(quantization.problems) - 1
        raise SdkitError(f"{model.path}: {quantization.problems[0]}"
                         + (f" (and {more} more problem{'s' if more > 1 else ''} with its scales)" if more else ""))
    identity = _identify_kind(model, hints, quantization)
    refuse_unusable(identity, model.path)
    if identity.kind == "unknown" and not identity.part and "unknown_transformer" not in identity.facts:
        identity.notes.append("no known key pattern: not a Stable Diffusion model part or adapter")
    identity.precision.label = quantization.label(identity.precision.dominant)
    identity.precision.quantization = quantization.to_facts()
    identity.notes += quantization.notes
    identity.notes += _gguf_architecture_notes(model, identity)
    describe(identity)
    _health_notes(model, identity, deep)
    notes, facts = metadata_notes(model.metadata)
    identity.notes += notes
    identity.facts.update(facts)
    step = model.extra.get("global_step")
    if isinstance(step, (int, float)):
        identity.facts["global_step"] = step
    return identity


def _gguf_architecture_notes(model: ModelFile, identity: Identity) -> list[str]:
    """ComfyUI-GGUF picks its model class by `general.architecture`: one that is not the
    family the weights show makes it build the wrong model."""
    declared = model.metadata.get("general.architecture") if model.format == "gguf" else None
    family = FAMILIES.get(identity.family)
    if declared is None or family is None or family.gguf_architecture in (None, declared):
        return []
    return [f"general.architecture says {declared!r} but the weights are {family.title} "
            f"(ComfyUI-GGUF expects {family.gguf_architecture!r})"]


def _identify_kind(model: ModelFile, hints: MetadataHints, quantization: QuantScan) -> Identity:
    if model.components:
        if model.extra.get("model_index") is None and len(model.components) == 1:
            (name, component), = model.components.items()
            return identify_component_folder(component, (model.extra.get("configs") or {}).get(name), hints)
        return identify_diffusers_folder(model, hints)
    if is_hypernetwork(model):
        return identify_hypernetwork(model)
    layout = embedding_layout(model)
    if layout is not None:
        return identify_embedding(model, layout, hints)
    scan = scan_lora(model)
    if is_lora_file(model, scan):
        return identify_lora(model, scan, hints)
    identity = identify_single_file(model, hints, logical_shapes=quantization.logical_shapes)
    if identity.kind == "unknown" and "unknown_transformer" not in identity.facts and not identity.refusal:
        return identify_auxiliary(model) or identity
    return identity


def _health_notes(model: ModelFile, identity: Identity, deep: bool) -> None:
    ema = ema_tensor_names(model)
    identity.facts["has_ema"] = bool(ema)
    if ema:
        identity.facts["ema_tensors"] = len(ema)
        identity.notes.append(f"EMA weights present ({len(ema)} model_ema.* tensors)")
    broken = broken_position_ids(model)
    if broken:
        identity.facts["broken_position_ids"] = broken
        for name, problem in broken.items():
            identity.notes.append(f"broken CLIP position_ids {name}: {problem}")
    if deep:
        bad = non_finite_tensors(model)
        identity.facts["nan_tensors"] = bad
        if bad:
            shown = ", ".join(bad[:_LISTED_NAMES])
            more = f" and {len(bad) - _LISTED_NAMES} more" if len(bad) > _LISTED_NAMES else ""
            identity.notes.append(f"{len(bad)} tensors hold NaN/Inf values: {shown}{more}")
