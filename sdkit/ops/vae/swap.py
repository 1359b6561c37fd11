"""VAE swap and extraction: put a standalone VAE into a checkpoint, or take one out.

A standalone VAE comes in either convention:
- A1111 / LDM (`.vae.pt`, `.vae.safetensors`, `.ckpt`): `encoder.*`, `decoder.*`,
  `quant_conv.*` keys, sometimes with the checkpoint's `first_stage_model.` prefix, `.ckpt`
  files wrapped in `state_dict` (unwrapped by the reader), and VAE-training leftovers that
  A1111 drops before loading (`loss*` discriminator weights, `model_ema.decay`,
  `model_ema.num_updates`);
- diffusers: a `vae/` folder (config.json + weights) or its `diffusion_pytorch_model.safetensors`.
Any model holding a VAE (a whole checkpoint, a pipeline folder) also serves as a source.

Keys are converted with the exact key maps (`sdkit.ops.layout`), using the
checkpoint's own VAE config, so the incoming VAE must have exactly the shapes of the one it
replaces; a different latent channel count is named as such. Everything streams: the
output's VAE tensors load from the VAE file, all others from the checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkit.arch import Identity, identify
from sdkit.arch.keymaps import checkpoint_from_ldm
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, TensorInfo, open_model, write_safetensors
from sdkit.io.output_path import build_in_partial, check_output_path
from sdkit.ops.folders import write_component_folder
from sdkit.ops.layout import ModelView, extract_component, model_view, replace_component
from sdkit.ops.recipe_meta import (
    DIFFUSERS_IMPLEMENTATION,
    InputDigests,
    SpecFacts,
    build_metadata,
)

Progress = Callable[[int], None]
CONVENTIONS = ("ldm", "diffusers")
_LDM_PREFIX = "first_stage_model."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


@dataclass
class VaeSource:
    """A VAE input, its tensors named as a standalone VAE (or as the model holding it)."""

    model: ModelFile
    identity: Identity
    dropped: list[str] = field(default_factory=list)  # training leftovers left out
    prefix_removed: bool = False  # the file carried `first_stage_model.` names


def is_training_leftover(key: str) -> bool:
    """Keys A1111 leaves out of a VAE file before loading it (sd_vae.load_vae_dict)."""
    return key.startswith("loss") or key in _EMA_BOOKKEEPING


def renamed_model(model: ModelFile, names: dict[str, str]) -> ModelFile:
    """`model` showing only `names` (new name -> name in the file); closing closes `model`."""
    infos = {new: TensorInfo(new, model.infos[old].dtype, model.infos[old].shape) for new, old in names.items()}
    return ModelFile(path=model.path, format=model.format, infos=infos, metadata=model.metadata,
                     extra=model.extra, size_bytes=model.size_bytes,
                     _loader=lambda name: model.load(names[name]), _closer=model.close)


def _standalone(model: ModelFile) -> VaeSource:
    """A single VAE file without leftovers and without the checkpoint prefix."""
    kept = [key for key in model.infos if not is_training_leftover(key)]
    dropped = [key for key in model.infos if is_training_leftover(key)]
    prefixed = bool(kept) and all(key.startswith(_LDM_PREFIX) for key in kept)
    names = {(key[len(_LDM_PREFIX):] if prefixed else key): key for key in kept}
    view = renamed_model(model, names) if dropped or prefixed else model
    return VaeSource(view, identify(view), dropped, prefixed)


@contextmanager
def open_vae_source(path: str | os.PathLike[str]) -> Iterator[VaeSource]:
    """Open a VAE in any of the layouts above; SdkitError when it holds no VAE."""
    model = open_model(path)
    try:
        source = VaeSource(model, identify(model)) if model.components else _standalone(model)
        if "vae" not in source.identity.components:
            raise SdkitError(f"{path}: holds no VAE (identified as {source.identity.kind})")
        yield source
    finally:
        model.close()


def check_latent_channels(base: ModelFile, base_identity: Identity, source: VaeSource) -> None:
    """Refuse a VAE whose latent channel count differs from the base's VAE."""
    wanted = base_identity.facts.get("latent_channels")
    found = source.identity.facts.get("latent_channels")
    if wanted is not None and found is not None and found != wanted:
        raise SdkitError(f"{source.model.path}: a VAE with {found} latent channels cannot replace "
                         f"{base.path}'s, which has {wanted}")


def vae_of(model: ModelFile, identity: Identity, convention: str) -> dict[str, LazyTensor]:
    """The model's VAE tensors in `convention`, named as a standalone VAE."""
    return extract_component(model, "vae", convention, identity=identity)


def vae_config(model: ModelFile, identity: Identity) -> dict[str, Any]:
    """The diffusers config of the model's VAE: its own config.json, or read off its shapes."""
    view = model_view(model, identity, "vae")
    if "vae" not in view.components:
        raise SdkitError(f"{model.path}: has no VAE")
    if view.convention == "diffusers" and "vae" in view.configs:
        return dict(view.configs["vae"])
    tensors = extract_component(model, "vae", "ldm", identity=identity)
    shapes = {_LDM_PREFIX + key: lazy.shape for key, lazy in tensors.items()}
    return dict(checkpoint_from_ldm(shapes, layout=view.layout).configs["vae"])


# ---- swap --------------------------------------------------------------------------------

@dataclass
class VaeSwapResult:
    output: Path
    written: str  # "file" | "folder"
    family: str
    convention: str  # key convention of the output
    vae_convention: str  # key convention of the VAE file as given
    vae_tensors: int
    checkpoint_sha256: str
    vae_sha256: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "written": self.written, "family": self.family,
                "convention": self.convention, "vae_convention": self.vae_convention,
                "vae_tensors": self.vae_tensors, "checkpoint_sha256": self.checkpoint_sha256,
                "vae_sha256": self.vae_sha256, "notes": self.notes}


def _source_notes(source: VaeSource) -> list[str]:
    notes = []
    if source.dropped:
        notes.append(f"left out {len(source.dropped)} VAE-training leftovers ({', '.join(source.dropped[:3])})")
    if source.prefix_removed:
        notes.append("the VAE file carried first_stage_model. names; read without the prefix")
    return notes


def swap_vae(checkpoint: str | os.PathLike[str], vae: str | os.PathLike[str], output: str | os.PathLike[str], *,
             force: bool = False, progress: Progress | None = None) -> VaeSwapResult:
    """Write `checkpoint` with its VAE replaced by `vae` to `output`.

    A single-file checkpoint gives a `.safetensors` file; a diffusers pipeline folder gives a
    copy of the folder with a new `vae/`. SdkitError for refused input, before anything is written.
    """
    checkpoint, vae, output = Path(checkpoint), Path(vae), Path(output)
    check_output_path(output, (checkpoint, vae), force=force)
    with open_model(checkpoint) as model, open_vae_source(vae) as source, InputDigests([checkpoint, vae]) as digests:
        identity = identify(model)
        if identity.kind != "checkpoint" or "vae" not in identity.components:
            raise SdkitError(f"{checkpoint}: not a checkpoint with a VAE (identified as {identity.kind} "
                             f"holding {', '.join(identity.components) or 'nothing known'})")
        view = model_view(model, identity)
        as_folder = view.convention == "diffusers"
        _check_output(model, output, as_folder)
        check_latent_channels(model, identity, source)
        tensors = replace_component(model, "vae", source.model, identity=identity, source_identity=source.identity)
        hashes = digests.placeholders
        # a folder gets the metadata on its new vae/ weights, a single file on the whole model
        facts = SpecFacts.from_identity(identity, adapter="vae" if as_folder else None,
                                        implementation=DIFFUSERS_IMPLEMENTATION if as_folder else None)
        metadata = build_metadata("vae swap", [checkpoint, vae], {"dropped_leftovers": len(source.dropped)}, facts,
                                  title=output.stem, carried={} if as_folder else model.metadata, hashes=hashes)
        if as_folder:
            _write_pipeline_copy(model, identity, source, view, tensors, metadata, output, force, progress,
                                 digests.patch)
        else:
            write_safetensors(output, tensors, metadata, overwrite=force, progress=progress, finish=digests.patch)
        return VaeSwapResult(output, "folder" if as_folder else "file", identity.family, view.convention,
                             source.identity.key_convention, sum(1 for name in tensors if _is_vae_name(view, name)),
                             digests.digest(checkpoint), digests.digest(vae), _source_notes(source))


def _check_output(model: ModelFile, output: Path, as_folder: bool) -> None:
    """Refuse an output path of the wrong kind before any work is done."""
    is_file_name = output.suffix.lower() in _SAFETENSORS_SUFFIXES
    if as_folder and model.extra.get("model_index") is None:
        raise SdkitError(f"{model.path}: a lone component folder is not a pipeline; give the pipeline folder")
    if as_folder and is_file_name:
        raise SdkitError(f"{output}: a diffusers pipeline is written as a folder; give a folder path")
    if not as_folder and not is_file_name:
        raise SdkitError(f"{output}: the output must be a .safetensors file")


def _is_vae_name(view: ModelView, name: str) -> bool:
    return name.startswith("vae/" if view.convention == "diffusers" else _LDM_PREFIX)


def _write_pipeline_copy(model: ModelFile, identity: Identity, source: VaeSource, view: ModelView,
                         tensors: dict[str, LazyTensor], metadata: dict[str, str], output: Path, force: bool,
                         progress: Progress | None, finish: Callable[[Path], None]) -> None:
    """A copy of the pipeline folder `model` with `vae/` written from the new tensors."""
    config = dict(view.configs.get("vae") or vae_config(model, identity))
    incoming = (source.model.extra.get("configs") or {}).get("vae") if source.model.components else None
    if isinstance(incoming, dict) and "force_upcast" in incoming:
        config["force_upcast"] = incoming["force_upcast"]  # whether it decodes in fp16 is the VAE's own trait
    vae_tensors = {name[len("vae/"):]: lazy for name, lazy in tensors.items() if name.startswith("vae/")}

    def fill(folder: Path) -> None:
        for entry in sorted(model.path.iterdir()):
            if entry.name == "vae":
                continue
            if entry.is_dir():
                shutil.copytree(entry, folder / entry.name)
            else:
                shutil.copy2(entry, folder / entry.name)
        (folder / "vae").mkdir()
        write_component_folder(folder / "vae", "vae", vae_tensors, config, metadata, progress, finish)

    build_in_partial(output, force, fill)


# ---- extract -----------------------------------------------------------------------------

@dataclass
class VaeExtractResult:
    output: Path
    written: str  # "file" | "folder"
    family: str
    convention: str
    tensors: int
    checkpoint_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"output": str(self.output), "written": self.written, "family": self.family,
                "convention": self.convention, "tensors": self.tensors,
                "checkpoint_sha256": self.checkpoint_sha256}


def extract_vae(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], *, to: str = "ldm",
                force: bool = False, progress: Progress | None = None) -> VaeExtractResult:
    """Write the VAE baked into `checkpoint` on its own (or a VAE file in another convention).

    `to="ldm"`: an A1111 `.vae.safetensors` (`encoder.*`, `decoder.*`, no prefix);
    `to="diffusers"`: diffusers keys, as one `.safetensors` file or, for any other output
    path, a `vae/`-style folder with config.json.
    """
    if to not in CONVENTIONS:
        raise SdkitError(f"--to must be one of {', '.join(CONVENTIONS)}, not {to!r}")
    checkpoint, output = Path(checkpoint), Path(output)
    check_output_path(output, (checkpoint,), force=force)
    as_file = output.suffix.lower() in _SAFETENSORS_SUFFIXES
    if not as_file and to == "ldm":
        raise SdkitError(f"{output}: the output must be a .safetensors file (a folder only with --to diffusers)")
    with ExitStack() as stack:
        source = stack.enter_context(open_vae_source(checkpoint))  # a VAE file too: its convention changes
        model, identity = source.model, source.identity
        tensors = vae_of(model, identity, to)
        config = None if as_file else vae_config(model, identity)
        digests = stack.enter_context(InputDigests([checkpoint]))
        facts = SpecFacts.from_identity(identity, adapter="vae", prediction="unknown",
                                        implementation=DIFFUSERS_IMPLEMENTATION if to == "diffusers" else None)
        metadata = build_metadata("vae extract", [checkpoint], {"to": to}, facts, title=output.stem,
                                  hashes=digests.placeholders)
        if config is None:
            write_safetensors(output, tensors, metadata, overwrite=force, progress=progress, finish=digests.patch)
        else:
            build_in_partial(output, force, lambda folder: write_component_folder(
                folder, "vae", tensors, config, metadata, progress, digests.patch))
        sha256 = digests.digest(checkpoint)
    return VaeExtractResult(output, "file" if as_file else "folder", identity.family, to, len(tensors), sha256)
