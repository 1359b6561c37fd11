"""Opening the inputs and seeing them all in one key space: LDM single-file names.

Single files (safetensors, restricted pickles) are used as they are. A diffusers folder
is mapped to the LDM single-file layout through `sdkit.arch.keymaps`: each LDM key reads
its diffusers tensor(s) lazily, so a folder merges with a single file key by key.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sdkit.errors import SdkitError, with_article
from sdkit.io.model_file import ModelFile, TensorInfo
from sdkit.ops.merge.hashes import InputHashes
from sdkit.ops.merge.plan import AlignedInput
from sdkit.ops.merge.provenance import InputFacts
from sdkit.ops.merge.recipe import RecipeInput

if TYPE_CHECKING:
    from sdkit.arch.identity import Identity

MERGEABLE_KINDS = ("checkpoint", "unet", "text-encoder", "vae")


def open_inputs(inputs: Sequence[RecipeInput], stack: ExitStack) -> list[ModelFile]:
    """Open every input (headers only), closed when `stack` closes."""
    from sdkit.io import open_model

    return [stack.enter_context(open_model(item.path)) for item in inputs]


def aligned_input(name: str, model: ModelFile) -> AlignedInput:
    """`model` seen with LDM single-file key names."""
    if model.format != "diffusers":
        return AlignedInput(name, str(model.path), dict(model.infos), model.load, model.span, model.elements)
    return _aligned_diffusers(name, model)


def _aligned_diffusers(name: str, model: ModelFile) -> AlignedInput:
    from sdkit.arch.keymaps import checkpoint_to_ldm

    configs = model.extra.get("configs", {})
    plan = checkpoint_to_ldm(model.infos, configs).plan
    infos = {key: _planned_info(key, recipe, model.infos) for key, recipe in plan.items()}

    def load(key: str) -> Any:
        recipe = plan[key]
        return recipe.apply([model.load(source) for source in recipe.sources])

    def span(key: str) -> Any:
        recipe = plan[key]  # a copy or reshape keeps the stored bytes as they are
        if recipe.kind in ("copy", "reshape") and len(recipe.sources) == 1:
            return model.span(recipe.sources[0])
        return None

    return AlignedInput(name, str(model.path), infos, load, span)


def _planned_info(key: str, recipe: Any, infos: dict[str, TensorInfo]) -> TensorInfo:
    """Dtype and shape of the tensor a key-map recipe will make (nothing is loaded)."""
    if recipe.kind == "arange":
        return TensorInfo(key, "I64", (1, recipe.arg))
    sources = [infos[source] for source in recipe.sources]
    first = sources[0]
    if recipe.kind == "reshape":
        shape = tuple(recipe.arg)
    elif recipe.kind == "transpose":
        shape = tuple(reversed(first.shape))
    elif recipe.kind == "concat":
        shape = (sum(s.shape[0] for s in sources), *first.shape[1:])
    elif recipe.kind == "split":
        shape = (first.shape[0] // recipe.arg[1], *first.shape[1:])
    else:
        shape = first.shape
    return TensorInfo(key, first.dtype, shape)


def mergeable_identity(model: ModelFile) -> Identity:
    """What the input is; refuses files that are not models (adapters, embeddings…)."""
    from sdkit.arch import identify

    identity = identify(model)
    if identity.kind not in MERGEABLE_KINDS:
        raise SdkitError(f"{model.path}: is {with_article(identity.part or identity.kind)}, not a model that can be merged "
                         f"({', '.join(MERGEABLE_KINDS)})")
    return identity


def check_same_family(models: Sequence[ModelFile], identities: Sequence[Identity]) -> None:
    """All inputs of one kind and family (before any input is read in full)."""
    first, first_path = identities[0], models[0].path
    for model, identity in zip(models[1:], identities[1:]):
        if identity.kind != first.kind:
            raise SdkitError(f"{model.path}: is {with_article(identity.part or identity.kind)}, but A ({first_path}) is {with_article(first.part or first.kind)}")
        if identity.family != first.family:
            raise SdkitError(f"{model.path}: is {identity.family}, but A ({first_path}) is "
                             f"{first.family}; models of different families cannot be merged")


def input_facts(name: str, model: ModelFile, identity: Identity, hashes: InputHashes,
                expected_sha256: str | None) -> InputFacts:
    """What provenance records of one input; refuses an input that changed since the
    recipe was written."""
    if expected_sha256 and expected_sha256.lower() != hashes.sha256:
        raise SdkitError(f"{model.path}: sha256 is {hashes.sha256[:12]}…, the recipe expects "
                         f"{expected_sha256[:12]}… (the file changed)")
    return InputFacts(name=name, path=str(Path(model.path).resolve()), kind=identity.kind,
                      sha256=hashes.sha256, legacy_hash=hashes.legacy,
                      metadata=dict(model.metadata), family=identity.family,
                      variant=identity.variant, prediction=identity.prediction,
                      nonstandard=identity.nonstandard)
