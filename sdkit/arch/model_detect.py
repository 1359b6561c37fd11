"""Identify full models and their parts: checkpoints, UNets / transformers, VAEs, text
encoders and ControlNets, as LDM single files or diffusers folders.

Single files (formats.md (g)): `model.diffusion_model.*` (denoiser), `first_stage_model.*` or
`vae.*` (VAE; ComfyUI's SD3 / FLUX checkpoints), `cond_stage_model.*` /
`conditioner.embedders.N.*` / `text_encoders.*` (text encoders), `control_model.*`
(ControlNet), or the same trees without prefix as standalone parts. A file holding two
denoiser designs is a mixture, identified as such and refused as a model.
Diffusers folders: one ModelFile per component, plus `model_index.json` and each config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sdkit.arch.components import TextEncoderFacts, VaeFacts, find_text_encoders, probe_vae
from sdkit.arch.denoiser import DenoiserFacts, probe_denoiser, probe_denoisers, unet_variant
from sdkit.arch.families import (DECODER_ARCHITECTURES, FAMILIES, encoder_spec, families_with_latent,
                                 family_from_pipeline_class)
from sdkit.arch.fingerprint import describe_unknown_transformer, looks_like_transformer, match_release
from sdkit.arch.hygiene import precision_of
from sdkit.arch.identity import Identity
from sdkit.arch.keyview import KeyView
from sdkit.arch.metadata import MetadataHints
from sdkit.arch.prediction import denoiser_prediction, zero_terminal_snr
from sdkit.arch.structure import (StructureHints, denoiser_family, dimension_mismatches,
                                  shared_encoder_users, text_encoder_family, vae_compatible_families, vae_mismatches)
from sdkit.errors import with_article
from sdkit.io.model_file import ModelFile

LogicalShapes = Mapping[str, "tuple[int, ...]"]
_DENOISER_ROOTS = ("model.diffusion_model.", "")
_VAE_PREFIXES = ("first_stage_model.", "vae.")

_CONTROLNET_MARKERS = ("control_model.", "controlnet_cond_embedding.", "controlnet_down_blocks.",
                       "controlnet_blocks.", "input_hint_block.", "zero_convs.")
_COMPONENT_ORDER = ("unet", "transformer", "controlnet", "vae", "text_encoder", "text_encoder_2",
                    "text_encoder_3", "text_encoder_4")


@dataclass
class Parts:
    """What a model file holds, measured."""

    denoiser: DenoiserFacts | None = None
    denoiser_view: KeyView | None = None
    denoiser_component: str = "unet"
    vae: VaeFacts | None = None
    encoders: list[TextEncoderFacts] = field(default_factory=list)
    controlnet: bool = False
    mixture: list[str] = field(default_factory=list)  # the denoisers of a file mixing two
    unknown_transformer: tuple[str, dict[str, Any]] | None = None  # what an unplaceable one holds

    def components(self) -> list[str]:
        names = [e.component for e in self.encoders]
        if self.denoiser is not None:
            names.append(self.denoiser_component)
        if self.vae is not None:
            names.append("vae")
        return order_components(names)


def order_components(names: list[str]) -> list[str]:
    unique = list(dict.fromkeys(names))
    known = [n for n in _COMPONENT_ORDER if n in unique]
    return known + sorted(n for n in unique if n not in _COMPONENT_ORDER)


def is_controlnet(model: ModelFile) -> bool:
    return any(name.startswith(_CONTROLNET_MARKERS) or ".input_hint_block." in name
               for name in model.infos)


def single_file_parts(model: ModelFile, logical_shapes: LogicalShapes | None = None) -> Parts:
    parts = Parts(controlnet=is_controlnet(model))
    if parts.controlnet:
        prefix = "control_model." if _has_prefix(model, "control_model.") else ""
        parts.denoiser_component = "controlnet"
    else:
        prefix = "model.diffusion_model." if _has_prefix(model, "model.diffusion_model.") else ""
        parts.mixture = _mixture(model, logical_shapes)
    parts.denoiser_view = KeyView(model, prefix, logical_shapes)
    parts.denoiser = probe_denoiser(parts.denoiser_view)
    if parts.denoiser is not None and parts.denoiser.architecture != "unet" and not parts.controlnet:
        parts.denoiser_component = "transformer"
    if parts.denoiser is None and not parts.controlnet and looks_like_transformer(parts.denoiser_view):
        parts.unknown_transformer = describe_unknown_transformer(parts.denoiser_view)
    vae_prefix = next((p for p in _VAE_PREFIXES if _has_prefix(model, p)), "")
    parts.vae = probe_vae(KeyView(model, vae_prefix))
    parts.encoders = find_text_encoders(KeyView(model))
    return parts


def _mixture(model: ModelFile, logical_shapes: LogicalShapes | None) -> list[str]:
    """The denoisers of a file that holds more than one design, in words (else [])."""
    found: dict[str, str] = {}
    for root in _DENOISER_ROOTS:
        if root and not _has_prefix(model, root):
            continue
        for facts in probe_denoisers(KeyView(model, root, logical_shapes)):
            found.setdefault(facts.family or "unet", _denoiser_words(facts, root))
    return list(found.values()) if len(found) > 1 else []


def _denoiser_words(facts: DenoiserFacts, root: str) -> str:
    if facts.family is not None:
        return f"{with_article(FAMILIES[facts.family].title)} transformer ({root}{facts.marker}*)"
    family = FAMILIES.get(denoiser_family(facts, [], StructureHints()))
    title = family.title if family else "unknown"
    blocks = "input_blocks" if facts.convention == "ldm" else "down_blocks"
    return f"{with_article(title)} UNet ({root}{blocks}.*)"


def _has_prefix(model: ModelFile, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in model.infos)


def kind_of(parts: Parts) -> str:
    if parts.mixture:
        return "unknown"
    if parts.controlnet:
        return "controlnet"
    if parts.denoiser is not None:
        return "checkpoint" if parts.vae or parts.encoders else "unet"
    if parts.vae is not None:
        return "checkpoint" if parts.encoders else "vae"
    return "text-encoder" if parts.encoders else "unknown"


def identify_single_file(model: ModelFile, hints: MetadataHints,
                         structure: StructureHints | None = None,
                         logical_shapes: LogicalShapes | None = None) -> Identity:
    parts = single_file_parts(model, logical_shapes)
    structure = structure or StructureHints()
    structure.playground = structure.playground or ("edm_mean" in model.infos and "edm_std" in model.infos)
    identity = _identify_parts(model, parts, hints, structure, scheduler_config=None)
    identity.key_convention = _single_file_convention(parts)
    identity.precision = precision_of(model, component_of_single_file(parts, identity.kind))
    _checkpoint_notes(model, parts, identity)
    return identity


def identify_component_folder(model: ModelFile, config: dict[str, Any] | None,
                              hints: MetadataHints) -> Identity:
    """A lone diffusers component folder: named by the user, so identified by its keys,
    with its config settling what keys cannot (refiner time ids, SD2 text activation, the
    latent format of a VAE)."""
    config = config or {}
    structure = StructureHints(
        kolors=config.get("encoder_hid_dim_type") == "text_proj",
        sd2_text_encoder=config.get("hidden_act") == "gelu",
        addition_time_embed_dim=config.get("addition_time_embed_dim"),
        vae_latent=_vae_latent(config),
    )
    return identify_single_file(model, hints, structure)


def _vae_latent(config: dict[str, Any]) -> tuple[float, float] | None:
    scale = config.get("scaling_factor")
    if not isinstance(scale, (int, float)) or "latent_channels" not in config:
        return None
    shift = config.get("shift_factor")
    return float(scale), float(shift) if isinstance(shift, (int, float)) else 0.0


def _single_file_convention(parts: Parts) -> str:
    if parts.denoiser is not None:
        return parts.denoiser.convention
    if parts.vae is not None:
        return parts.vae.convention
    if parts.encoders:
        hf_bare = all(e.architecture == "clip" and not e.prefix for e in parts.encoders)
        return "diffusers" if hf_bare else "ldm"
    return "unknown"


def identify_diffusers_folder(model: ModelFile, hints: MetadataHints) -> Identity:
    index = model.extra.get("model_index") or {}
    configs = model.extra.get("configs") or {}
    parts = Parts()
    for name, component in model.components.items():
        view = KeyView(component)
        if name in ("unet", "transformer"):
            parts.denoiser, parts.denoiser_view, parts.denoiser_component = probe_denoiser(view), view, name
        elif name == "vae":
            parts.vae = probe_vae(view)
        elif name.startswith("text_encoder"):
            parts.encoders += find_text_encoders(view, component=name)
    identity = _identify_parts(model, parts, hints, _pipeline_hints(index, configs, model),
                               scheduler_config=configs.get("scheduler"))
    identity.key_convention = "diffusers"
    identity.components = order_components(list(model.components))
    identity.precision = precision_of(model, lambda name: name.split("/", 1)[0])
    if index.get("_class_name"):
        identity.facts["pipeline_class"] = index["_class_name"]
        _check_pipeline_class(identity, str(index["_class_name"]))
    return identity


def _check_pipeline_class(identity: Identity, class_name: str) -> None:
    """The family a pipeline class names (QwenImageEditPipeline: Qwen-Image) settles a folder
    whose weights name none, and is noted where the weights say otherwise."""
    named = family_from_pipeline_class(class_name)
    if named is None or named == identity.family:
        return
    if identity.family == "unknown":
        identity.family = named
        identity.notes.append(f"family from model_index.json: {class_name}")
    else:
        identity.notes.append(f"model_index.json names {class_name} ({FAMILIES[named].title}); "
                              f"the weights say {identity.family}")


def _pipeline_hints(index: dict[str, Any], configs: dict[str, Any], model: ModelFile) -> StructureHints:
    class_name = str(index.get("_class_name", ""))
    unet_config = configs.get("unet") or {}
    vae_config = configs.get("vae") or {}
    scheduler = index.get("scheduler")
    encoders = {n for n in model.components if n.startswith("text_encoder")}
    refiner = None
    if index.get("requires_aesthetics_score") is True or encoders == {"text_encoder_2"}:
        refiner = True
    elif {"text_encoder", "text_encoder_2"} <= encoders:
        refiner = False
    edm = isinstance(scheduler, list) and str(scheduler[-1]).startswith("EDM")
    latent_stats = vae_config.get("latents_mean") is not None and vae_config.get("scaling_factor") == 0.5
    return StructureHints(
        playground=edm or latent_stats,
        kolors="Kolors" in class_name or unet_config.get("encoder_hid_dim_type") == "text_proj",
        refiner=refiner,
        sd2_text_encoder=(configs.get("text_encoder") or {}).get("hidden_act") == "gelu",
        addition_time_embed_dim=unet_config.get("addition_time_embed_dim"),
    )


def _identify_parts(model: ModelFile, parts: Parts, hints: MetadataHints,
                    structure: StructureHints, scheduler_config: dict[str, Any] | None) -> Identity:
    identity = Identity(kind=kind_of(parts))
    if parts.mixture:
        _describe_mixture(parts, identity)
        return identity
    if parts.denoiser is not None:
        _describe_denoiser(model, parts, hints, structure, scheduler_config, identity)
    elif parts.encoders and parts.vae is None:
        identity.family = hints.family or text_encoder_family(parts.encoders, structure)
        if identity.family == "unknown":
            _note_encoder_users(parts.encoders, identity)
        _assign_encoder_slots(parts.encoders, identity.family)
        _flag_mismatches(identity, dimension_mismatches(identity.family, None, parts.encoders, None))
    elif parts.vae is not None:
        _describe_vae(parts, hints, structure, identity)
    if parts.unknown_transformer is not None:
        text, facts = parts.unknown_transformer
        identity.facts["unknown_transformer"] = dict(facts, description=text)
    identity.components = parts.components()
    if parts.vae is not None:
        identity.facts["vae"] = parts.vae.to_facts()
        identity.facts["latent_channels"] = parts.vae.latent_channels
    if parts.encoders:
        identity.facts["text_encoders"] = [e.to_facts() for e in parts.encoders]
    return identity


def _describe_denoiser(model: ModelFile, parts: Parts, hints: MetadataHints,
                       structure: StructureHints, scheduler_config: dict[str, Any] | None,
                       identity: Identity) -> None:
    denoiser = parts.denoiser
    structural = denoiser_family(denoiser, parts.encoders, structure)
    identity.family = structural
    _assign_encoder_slots(parts.encoders, structural)
    if hints.family and hints.family != structural:
        identity.notes.append(f"metadata ({hints.family_source}) says {hints.family}; "
                              f"the weights say {structural}")
    identity.variant = unet_variant(denoiser)  # the input channels decide, whatever metadata says
    if denoiser.dims is not None:
        _describe_release(model, denoiser, identity)
    _describe_lineage(model, identity)
    identity.prediction, identity.prediction_evidence = denoiser_prediction(
        identity.family, identity.variant, model, parts.denoiser_view, hints, scheduler_config)
    ztsnr = zero_terminal_snr(model, scheduler_config)
    if ztsnr is not None:
        identity.facts["zero_terminal_snr"] = ztsnr
        identity.notes.append(f"trained for zero terminal SNR ({ztsnr}): sample with a rescaled schedule")
    facts = denoiser.to_facts()
    identity.facts.update({
        "unet_channels": denoiser.channels, "in_channels": denoiser.in_channels,
        "context_dim": denoiser.context_dim, "adm_channels": denoiser.adm_channels,
        "denoiser": facts,
    })
    _flag_mismatches(identity, dimension_mismatches(identity.family, denoiser, parts.encoders, parts.vae))


def _describe_release(model: ModelFile, denoiser: DenoiserFacts, identity: Identity) -> None:
    """Which release a transformer is: its variant, and what the weights cannot tell."""
    family = FAMILIES[identity.family]
    match = match_release(family, denoiser.dims or {}, denoiser.flags or {},
                          model.metadata.get("modelspec.architecture", ""))
    if match.release is None:
        return
    identity.variant = match.release.variant
    identity.facts["design"] = match.release.name
    if match.exact:
        identity.facts["release"] = match.release.name
    if match.named_by_metadata:
        identity.notes.append(f"named {match.release.name} by modelspec.architecture "
                              f"{match.named_by_metadata!r}: its weights have the keys and shapes of "
                              + " and ".join(match.look_alikes))
    elif match.look_alikes:
        identity.facts["release_look_alikes"] = match.look_alikes
        verb = "has" if len(match.look_alikes) == 1 else "have"
        identity.notes.append(f"{match.release.name} architecture: " + ", ".join(match.look_alikes)
                              + f" {verb} the same keys and shapes; only metadata can name them")


# where a model's name is written, most deliberate first
_NAME_FIELDS = ("modelspec.title", "ss_output_name", "ss_sd_model_name")


def _describe_lineage(model: ModelFile, identity: Identity) -> None:
    """The line of fine-tunes a model of a family with lineages belongs to, by the first of
    its metadata titles or its file name that names one."""
    family = FAMILIES.get(identity.family)
    if family is None or not family.lineages:
        return
    named = [(key, model.metadata.get(key, "")) for key in _NAME_FIELDS]
    named.append(("file name", model.path.name))
    for source, text in named:
        words = text.lower()
        lineage = next((line for line in family.lineages if any(word in words for word in line.words)), None)
        if lineage is not None:
            identity.facts["lineage"] = lineage.name
            identity.notes.append(f"{lineage.name} by its {source} {text!r} ({family.title} weights: "
                                  "only names tell the line)")
            return


def _note_encoder_users(encoders: list[TextEncoderFacts], identity: Identity) -> None:
    """Say which models run with text encoders that name no family by themselves (several
    do, or only models sdkit has no family for)."""
    families, others = shared_encoder_users(encoders)
    if not families and not others:
        return
    identity.facts["encoder_families"] = families
    if others:
        identity.facts["encoder_other_models"] = others
    names = [FAMILIES[f].title for f in families] + others
    parts = " + ".join(spec.part for spec in (encoder_spec(**e.to_facts()) for e in encoders) if spec)
    which = "; the weights alone do not tell which" if len(names) > 1 else ""
    identity.notes.append(f"{parts}: used by {', '.join(names)}{which}")


def _assign_encoder_slots(encoders: list[TextEncoderFacts], family: str) -> None:
    """ComfyUI's `text_encoders.<slot>` names no diffusers component, nor does a language
    model's own file: the family's own encoder of that kind and width does (T5-XXL is SD3's
    text_encoder_3, FLUX.1's _2; Llama-3.1-8B is HiDream's text_encoder_4)."""
    ref = FAMILIES.get(family)
    for encoder in encoders:
        placed = encoder.prefix.startswith("text_encoders.") or encoder.architecture in DECODER_ARCHITECTURES
        if ref is None or not placed:
            continue
        spec = encoder_spec(**encoder.to_facts())
        mine = next((s for s in ref.text_encoders if spec is not None and s.part == spec.part), None)
        if mine is not None:
            encoder.component = mine.component


def _describe_mixture(parts: Parts, identity: Identity) -> None:
    listed = " and ".join(parts.mixture)
    identity.part = f"mixture: {listed}"
    identity.refusal = f"mixes model families: {listed}; expected one diffusion model per file"
    identity.facts["mixture"] = list(parts.mixture)
    identity.notes.append(f"holds {listed}: not one model")


def _describe_vae(parts: Parts, hints: MetadataHints, structure: StructureHints,
                  identity: Identity) -> None:
    vae = parts.vae
    compatible = vae_compatible_families(vae)
    identity.family = (hints.family or _family_by_latent(vae, structure) or _family_by_design(vae)
                       or _video_vae_family(vae, compatible))
    identity.facts["compatible_families"] = compatible
    if structure.vae_latent is not None:
        scale, shift = structure.vae_latent
        identity.facts["stated_latent"] = {"scaling_factor": scale, "shift_factor": shift, "families": [
            name for name in families_with_latent(vae.latent_channels, scale, shift, video=vae.video)]}
    if compatible and identity.family == "unknown":
        identity.notes.append(f"{vae.latent_channels}-channel VAE: fits " + ", ".join(compatible))
    _flag_mismatches(identity, vae_mismatches(vae, identity.family))


def _video_vae_family(vae: VaeFacts, compatible: list[str]) -> str:
    """A video VAE whose design only one family has names that family (Wan's 3-D VAEs);
    image VAEs are shared by families (SD1 / SD2 / SDXL, SD3 / FLUX.1) and name none."""
    return compatible[0] if vae.video and len(compatible) == 1 else "unknown"


def _family_by_latent(vae: VaeFacts, structure: StructureHints) -> str | None:
    """The one family whose latent format a VAE config states (FLUX.1's 0.3611 / 0.1159);
    the weights alone cannot tell VAEs of one design apart."""
    if structure.vae_latent is None:
        return None
    scale, shift = structure.vae_latent
    matching = families_with_latent(vae.latent_channels, scale, shift, video=vae.video)
    # families sharing one VAE (Chroma runs on FLUX.1's): the VAE is the first one's
    return matching[0] if len({FAMILIES[name].vae_part for name in matching}) == 1 else None


def _family_by_design(vae: VaeFacts) -> str | None:
    """The family whose VAE design alone the weights show: a latent normalized by the
    VAE's own BatchNorm statistics over the 2x2-patchified channels (FLUX.2's 32 x 4)."""
    if vae.latent_norm_channels != 4 * vae.latent_channels:
        return None
    matching = [name for name in vae_compatible_families(vae) if FAMILIES[name].latent.batch_norm]
    return matching[0] if len(matching) == 1 else None


def _flag_mismatches(identity: Identity, mismatches: list[str]) -> None:
    if mismatches:
        identity.nonstandard = True
        identity.notes.append("non-standard dimensions: " + "; ".join(mismatches))


def _checkpoint_notes(model: ModelFile, parts: Parts, identity: Identity) -> None:
    if identity.kind == "checkpoint":
        if parts.vae is not None:
            identity.notes.append("contains a baked VAE")
        else:
            identity.notes.append("no VAE")
        if not parts.encoders:
            identity.notes.append("no text encoder")
        if parts.denoiser is None:
            identity.notes.append("no UNet")
    if _has_prefix(model, "depth_model."):
        identity.notes.append("contains a MiDaS depth estimator (depth_model.*)")
    if identity.family == "playground-v2.5":
        identity.notes.append("EDM latent statistics present (edm_mean, edm_std)")
    identity.facts["scheduler_buffers"] = "alphas_cumprod" in model.infos


def component_of_single_file(parts: Parts, kind: str) -> Callable[[str], str]:
    """Key -> component name, for the per-component precision of a single file."""
    prefixes = [("model.diffusion_model.", parts.denoiser_component),
                ("control_model.", "controlnet"), ("first_stage_model.", "vae"), ("vae.", "vae"),
                ("model_ema.", "ema")]
    prefixes += [(e.prefix, e.component) for e in parts.encoders if e.prefix]
    prefixes.sort(key=lambda item: -len(item[0]))
    bare = parts.components()[0] if parts.components() and kind != "checkpoint" else "other"

    def component_of(name: str) -> str:
        for prefix, component in prefixes:
            if name.startswith(prefix):
                return component
        return bare

    return component_of

