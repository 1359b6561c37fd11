"""Assemble one all-in-one checkpoint from a diffusion model, its text encoders and its VAE.

The layout is the one ComfyUI's checkpoint loader reads for the transformer families
(`comfy/supported_models.py`: `vae_key_prefix` `vae.`, `text_encoder_key_prefix`
`text_encoders.`, each encoder under `<name>.transformer.` with its Hugging Face key names;
the diffusion model under `model.diffusion_model.` in its single-file names). The family
module says which parts the model needs (its release's text encoders, else the family's,
and its VAE): a missing part, a part of another family or a VAE of another latent space is
refused, naming it. A diffusion model in diffusers names goes through the family's key map.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sdkit.arch import Identity, identify
from sdkit.arch.families import FAMILIES, encoder_spec
from sdkit.arch.families.spec import Family, TextEncoderSpec
from sdkit.arch.fingerprint import match_transformers
from sdkit.arch.keymaps.transformer import transformer_plan
from sdkit.arch.keyview import KeyView
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, open_model, write_safetensors
from sdkit.io.output_path import check_output_path
from sdkit.ops.layout import plan_tensors
from sdkit.ops.parts.split import DENOISER_ROOT
from sdkit.ops.recipe_meta import InputDigests, build_metadata

VAE_ROOT = "vae."
ENCODER_ROOT = "text_encoders."
# Hugging Face CLIP text-model keys that transformers 5 writes without `text_model.`
_CLIP_TEXT_MODEL = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass
class _Given:
    path: Path
    model: ModelFile
    identity: Identity


@dataclass
class JoinResult:
    output: Path
    family: str
    parts: list[dict[str, str]] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "family": self.family, "parts": self.parts,
                "tensors": self.tensors, "bytes": self.bytes}


def join_parts(sources: list[str | os.PathLike[str]], output: str | os.PathLike[str], *, force: bool = False,
               progress: Callable[[int], None] | None = None) -> JoinResult:
    """Write `output`: the parts in `sources` as one checkpoint ComfyUI loads."""
    paths, output = [Path(source) for source in sources], Path(output)
    check_output_path(output, paths, force=force)
    if output.suffix.lower() != ".safetensors":
        raise SdkitError(f"{output}: the output must be a .safetensors file")
    with ExitStack() as stack:
        given = [_Given(path, stack.enter_context(open_model(path)), None) for path in paths]
        for part in given:
            part.identity = identify(part.model)
        denoiser, encoders, vae = _sorted(given)
        family = _family_of(denoiser)
        result = JoinResult(output, family.name)
        tensors = _denoiser_tensors(denoiser, family, result)
        tensors.update(_encoder_tensors(encoders, denoiser, family, result))
        tensors.update(_vae_tensors(vae, family, result))
        with InputDigests(paths) as digests:
            metadata = build_metadata("join", paths, {"parts": [p["kind"] for p in result.parts]},
                                      denoiser.identity, title=output.stem, carried=denoiser.model.metadata,
                                      hashes=digests.placeholders)
            write_safetensors(output, tensors, metadata, overwrite=force, progress=progress, finish=digests.patch)
        result.tensors, result.bytes = len(tensors), output.stat().st_size
    return result


def _sorted(given: list[_Given]) -> tuple[_Given, list[_Given], _Given | None]:
    denoisers = [g for g in given if g.identity.kind == "unet"]
    encoders = [g for g in given if g.identity.kind == "text-encoder"]
    vaes = [g for g in given if g.identity.kind == "vae"]
    others = [g for g in given if g not in denoisers + encoders + vaes]
    if others:
        raise SdkitError(f"{others[0].path}: is {with_article(others[0].identity.part)}; join takes parts: "
                         "one diffusion model, its text encoders and its VAE")
    if len(denoisers) != 1:
        listed = ", ".join(str(g.path) for g in denoisers) or "none"
        raise SdkitError(f"join needs one diffusion model among the parts, not {len(denoisers)} ({listed})")
    if len(vaes) > 1:
        raise SdkitError(f"join takes one VAE, not {len(vaes)} ({', '.join(str(g.path) for g in vaes)})")
    return denoisers[0], encoders, vaes[0] if vaes else None


def _family_of(denoiser: _Given) -> Family:
    family = FAMILIES.get(denoiser.identity.family)
    if family is None:
        raise SdkitError(f"{denoiser.path}: is {with_article(denoiser.identity.part)} of no family sdkit knows")
    if family.denoiser == "unet":
        raise SdkitError(f"{denoiser.path}: is {with_article(denoiser.identity.part)}; join writes ComfyUI's "
                         "all-in-one layout of the transformer families (an SD1/SD2/SDXL checkpoint takes a "
                         "VAE with `sdkit vae swap`)")
    return family


def _needed_encoders(denoiser: _Given, family: Family) -> tuple[TextEncoderSpec, ...]:
    release = family.release(denoiser.identity.facts.get("release") or denoiser.identity.facts.get("design") or "")
    return (release.text_encoders if release else ()) or family.text_encoders


# ---- the diffusion model -------------------------------------------------------------------

def _denoiser_tensors(denoiser: _Given, family: Family, result: JoinResult) -> dict[str, LazyTensor]:
    model = denoiser.model
    root = DENOISER_ROOT if any(name.startswith(DENOISER_ROOT) for name in model.infos) else ""
    tensors = lazy_tensors(model)
    if denoiser.identity.key_convention == "diffusers" and family.key_map is not None \
            and not family.key_map.same_names:
        tensors = _single_file_names(denoiser, family, tensors, root)
        root = ""
    result.parts.append({"kind": "diffusion model", "name": denoiser.identity.part, "path": str(denoiser.path)})
    return {DENOISER_ROOT + name[len(root):]: lazy for name, lazy in tensors.items()}


def _single_file_names(denoiser: _Given, family: Family, tensors: dict[str, LazyTensor],
                       root: str) -> dict[str, LazyTensor]:
    match = match_transformers(KeyView(denoiser.model, root))[0]
    try:
        plan = transformer_plan(family, match.dims, "diffusers_to_ldm", list(tensors), root)
    except SdkitError as exc:
        raise SdkitError(f"{denoiser.path}: {exc}") from None
    return plan_tensors(plan, tensors)


# ---- text encoders ----------------------------------------------------------------------------

def _encoder_tensors(encoders: list[_Given], denoiser: _Given, family: Family,
                     result: JoinResult) -> dict[str, LazyTensor]:
    needed = {spec.part: spec for spec in _needed_encoders(denoiser, family)}
    found: dict[str, _Given] = {}
    out: dict[str, LazyTensor] = {}
    for given in encoders:
        for facts in given.identity.facts.get("text_encoders") or []:
            part = _encoder_part(facts, needed.values())
            if part not in needed:
                raise SdkitError(f"{given.path}: is {with_article(part)}, not a text encoder of {family.title} "
                                 f"(it needs {', '.join(needed)})")
            if part in found:
                raise SdkitError(f"{given.path}: a second {part} ({found[part].path} is one already)")
            found[part] = given
            out.update(checkpoint_encoder_keys(given.path, given.model, facts, needed[part]))
            result.parts.append({"kind": "text encoder", "name": part, "path": str(given.path)})
    missing = [part for part in needed if part not in found]
    if missing:
        raise SdkitError(f"{denoiser.path}: {with_article(denoiser.identity.part)} needs "
                         f"{', '.join(missing)} too; give {'them' if len(missing) > 1 else 'it'} as parts")
    return out


def _encoder_part(facts: dict[str, Any], needed: Iterable[TextEncoderSpec]) -> str:
    """The released encoder these facts are; an encoder of other sizes (a pruned or test
    model) takes the one needed slot of its architecture, where there is one."""
    spec = encoder_spec(**facts)
    if spec is not None:
        return spec.part
    same_design = [s for s in needed if _design(s.architecture) == _design(facts["architecture"])]
    if len(same_design) == 1:
        return same_design[0].part
    return f"{facts['architecture']} text encoder (width {facts['width']})"


def _design(architecture: str) -> str:
    return "clip" if architecture in ("clip", "openclip") else architecture


def checkpoint_encoder_keys(path: Path, model: ModelFile, facts: dict[str, Any],
                            spec: TextEncoderSpec) -> dict[str, LazyTensor]:
    """A text encoder's tensors (`facts` as identify found it in `model`) named as an
    all-in-one checkpoint keeps them: `text_encoders.<ComfyUI's name>.transformer.<HF key>`."""
    if not spec.comfyui_name:
        raise SdkitError(f"{path}: sdkit does not know the name ComfyUI gives {spec.part} inside an "
                         "all-in-one checkpoint")
    if facts["architecture"] == "openclip":
        raise SdkitError(f"{path}: holds {spec.part} in OpenCLIP names; ComfyUI's all-in-one "
                         "checkpoints hold it in Hugging Face names (convert it with `sdkit convert --to diffusers "
                         "--only text_encoder_2`)")
    prefix = facts["prefix"]
    root = f"{ENCODER_ROOT}{spec.comfyui_name}.transformer."
    add_text_model = facts["architecture"] == "clip" and facts.get("text_model_level") is False
    out = {}
    for name, lazy in lazy_tensors(model).items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if add_text_model and key.startswith(_CLIP_TEXT_MODEL):
            key = "text_model." + key
        out[root + key] = lazy
    return out


# ---- the VAE --------------------------------------------------------------------------------------

def _vae_tensors(vae: _Given | None, family: Family, result: JoinResult) -> dict[str, LazyTensor]:
    if vae is None:
        if family.vae_part:
            raise SdkitError(f"{family.title} needs {family.vae_part} too; give it as a part")
        return {}
    channels = vae.identity.facts.get("latent_channels")
    fitting = {latent.channels for latent, _part in family.latents()}
    if channels not in fitting:
        raise SdkitError(f"{vae.path}: is {with_article(vae.identity.part)}; {family.title} needs a "
                         f"{'/'.join(str(c) for c in sorted(fitting))}-channel VAE ({family.vae_part})")
    if vae.identity.key_convention != "ldm":
        raise SdkitError(f"{vae.path}: is a VAE in diffusers names; give it in single-file names "
                         "(`sdkit convert VAE --to single-file -o ae.safetensors`)")
    root = next((r for r in ("first_stage_model.", VAE_ROOT) if any(n.startswith(r) for n in vae.model.infos)), "")
    result.parts.append({"kind": "VAE", "name": vae.identity.part, "path": str(vae.path)})
    return {VAE_ROOT + name[len(root):]: lazy for name, lazy in lazy_tensors(vae.model).items()}
