"""Split an all-in-one checkpoint into the parts ComfyUI keeps in its model folders.

Each part is the checkpoint's keys under that part's prefix with the prefix removed, which
is how the standalone files are named: the diffusion model as ComfyUI's diffusion-model
loader reads it (`double_blocks.*`, `input_blocks.*`: BFL / LDM names), each text encoder
in its own spelling (Hugging Face names for CLIP-L, T5 and the language models under
ComfyUI's `text_encoders.<name>.transformer.`; OpenCLIP's for SD 2.x and SDXL bigG), the
VAE in LDM names (`ae.safetensors`, A1111 `.vae.safetensors`). Bytes are copied as stored,
quantized ones included (a scaled-fp8 marker goes with the diffusion model it marks).

Output: `FOLDER/diffusion_models/<stem>.safetensors`, `FOLDER/text_encoders/<stem>_<name>
.safetensors` (`clip_l`, `t5xxl`, … as ComfyUI names the encoder), `FOLDER/vae/<stem>_vae
.safetensors`, all written into a hidden folder first and moved into place together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdkit.arch import Identity, identify
from sdkit.arch.families import FAMILIES, encoder_spec
from sdkit.errors import SdkitError, with_article
from sdkit.io import ModelFile, lazy_tensors, open_model, write_safetensors
from sdkit.io.output_path import build_in_partial, check_output_path
from sdkit.ops.recipe_meta import BackgroundHash, build_metadata

DENOISER_ROOT = "model.diffusion_model."
VAE_ROOTS = ("first_stage_model.", "vae.")
_SHOWN = 3


@dataclass(frozen=True)
class Part:
    """One part of a checkpoint: where its keys are and where it goes."""

    kind: str  # "diffusion model" | "text encoder" | "VAE"
    name: str  # what people call it: "FLUX.1-dev", "CLIP-L", "FLUX VAE"
    prefix: str  # its keys' prefix in the checkpoint
    folder: str  # ComfyUI's folder for it
    file_name: str


@dataclass
class SplitResult:
    output: Path
    parts: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # keys under no part (EMA copies, logit scales)

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "parts": self.parts, "left_out": self.left_out}


def split_checkpoint(source: str | os.PathLike[str], output: str | os.PathLike[str], *, force: bool = False,
                     progress: Callable[[int], None] | None = None) -> SplitResult:
    """Write every part of the checkpoint `source` into ComfyUI's folders under `output`."""
    source, output = Path(source), Path(output)
    check_output_path(output, [source], force=force)
    with open_model(source) as model:
        identity = _checkpoint_identity(model)
        parts = checkpoint_parts(model, identity, source.stem)
        result = SplitResult(output, left_out=_left_out(model, parts))
        input_hash = BackgroundHash(model.path)
        try:
            build_in_partial(output, force, lambda folder: _write_parts(folder, model, identity, parts, result,
                                                                        input_hash, progress))
        except BaseException:
            input_hash.cancel()
            raise
    return result


def _checkpoint_identity(model: ModelFile) -> Identity:
    if model.components:
        raise SdkitError(f"{model.path}: a diffusers folder keeps its parts one per folder already; convert "
                         "one with `sdkit convert FOLDER/<part> --to single-file`")
    identity = identify(model)
    if identity.kind != "checkpoint":
        raise SdkitError(f"{model.path}: is {with_article(identity.part)}, not a checkpoint holding a diffusion "
                         "model with its text encoders or VAE; nothing to split")
    return identity


def checkpoint_parts(model: ModelFile, identity: Identity, stem: str) -> list[Part]:
    """The parts of an all-in-one checkpoint, with their prefixes and output names."""
    parts = []
    if any(name.startswith(DENOISER_ROOT) for name in model.infos):
        parts.append(Part("diffusion model", identity.facts.get("release") or identity.family or "unknown",
                          DENOISER_ROOT, "diffusion_models", f"{stem}.safetensors"))
    for encoder in identity.facts.get("text_encoders") or []:
        spec = encoder_spec(**encoder)
        short = _encoder_file_name(encoder["prefix"], spec.comfyui_name if spec else "", encoder["component"])
        parts.append(Part("text encoder", spec.part if spec else encoder["architecture"], encoder["prefix"],
                          "text_encoders", f"{stem}_{short}.safetensors"))
    root = next((root for root in VAE_ROOTS if any(name.startswith(root) for name in model.infos)), None)
    if root is not None and "vae" in identity.components:
        parts.append(Part("VAE", _vae_name(identity), root, "vae", f"{stem}_vae.safetensors"))
    return parts


def _vae_name(identity: Identity) -> str:
    family = FAMILIES.get(identity.family)
    channels = identity.facts.get("latent_channels")
    return (family.vae_part_for(channels) if channels else family.vae_part) if family else "VAE"


def _encoder_file_name(prefix: str, comfyui_name: str, component: str) -> str:
    """ComfyUI's own name where the checkpoint used it (`text_encoders.clip_l.`), else the
    name ComfyUI gives that encoder, else the diffusers component."""
    words = prefix.split(".")
    if words[0] == "text_encoders" and len(words) > 2:
        return words[1]
    return comfyui_name or component


def _left_out(model: ModelFile, parts: list[Part]) -> list[str]:
    prefixes = tuple(part.prefix for part in parts)
    return [name for name in model.infos if not name.startswith(prefixes)]


def _write_parts(folder: Path, model: ModelFile, identity: Identity, parts: list[Part], result: SplitResult,
                 input_hash: BackgroundHash, progress: Callable[[int], None] | None) -> None:
    tensors = lazy_tensors(model)
    for part in parts:
        mine = {name[len(part.prefix):]: lazy for name, lazy in tensors.items() if name.startswith(part.prefix)}
        (folder / part.folder).mkdir(exist_ok=True)
        path = folder / part.folder / part.file_name
        metadata = _metadata(model, identity, part, input_hash)
        write_safetensors(path, mine, metadata, progress=progress, finish=input_hash.patch)
        result.parts.append({"kind": part.kind, "name": part.name, "path": f"{part.folder}/{part.file_name}",
                             "tensors": len(mine), "bytes": path.stat().st_size})


def _metadata(model: ModelFile, identity: Identity, part: Part, input_hash: BackgroundHash) -> dict[str, str]:
    """The checkpoint's own metadata and ModelSpec go with its diffusion model; every part
    records where it came from."""
    is_model = part.kind == "diffusion model"
    return build_metadata("split", [model.path], {"part": part.kind, "prefix": part.prefix},
                          identity if is_model else None, title=Path(part.file_name).stem,
                          carried=model.metadata if is_model else None,
                          hashes={str(model.path): input_hash.placeholder})


def left_out_note(result: SplitResult) -> str | None:
    if not result.left_out:
        return None
    shown = ", ".join(result.left_out[:_SHOWN]) + (", …" if len(result.left_out) > _SHOWN else "")
    return f"{len(result.left_out)} keys belong to no part and were left out ({shown})"
