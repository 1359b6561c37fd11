"""Running a merge recipe: open, check, plan, then stream the output key by key.

Inputs are opened lazily (headers only; tensors memory-mapped when a key is computed),
every check runs before the first byte is written (method and parameters, model kinds
and families, shapes, block names, disk space), and the output is written through the
streaming writer with one LazyTensor per key whose `load` computes that key's merge. So
peak memory is a few tensors, whatever the model size and the number of inputs.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from sdkit.arch.blocks import TEXT_ENCODERS, Layout, model_block_layout
from sdkit.errors import SdkitError
from sdkit.ops.merge.align import (aligned_input, check_same_family, input_facts,
                                   mergeable_identity, open_inputs)
from sdkit.ops.merge.compute import KeyComputer
from sdkit.ops.merge.hashes import InputHashes, hash_inputs, legacy_hash, start_hashes
from sdkit.ops.merge.plan import MERGE, AlignedInput, MergePlan, PlanReport, build_plan
from sdkit.io.ahead import DEFAULT_WORKERS, single_threaded_torch
from sdkit.io.output_path import check_output_path
from sdkit.ops.merge.provenance import InputFacts, merge_metadata
from sdkit.ops.merge.recipe import MergeRecipe, RecipeInput
from sdkit.ops.recipe_meta import BackgroundHash
from sdkit.ops.merge.registry import BLEND_PARAM, MergeMethod, get_method, input_index, input_letter
from sdkit.ops.block_weights import (KeyWeights, component_names, resolve_blocks,
                                     resolve_components)

HEADER_ALLOWANCE = 1 << 20  # header and metadata, generously
ProgressCallback = Callable[[int], None]


@dataclass
class MergeResult:
    """What a merge did."""

    path: Path
    recipe: MergeRecipe  # with each input's sha256 filled in
    report: PlanReport
    non_finite: dict[str, int] = field(default_factory=dict)  # kept with allow_nan
    output_bytes: int = 0


@dataclass
class PreparedMerge:
    """A checked, planned merge whose tensors can be produced on demand."""

    recipe: MergeRecipe
    inputs: list[AlignedInput]
    facts: list[InputFacts]
    plan: MergePlan
    computer: KeyComputer
    pending: list[BackgroundHash] = field(default_factory=list)  # input hashes still running

    def compute(self, key: str) -> Any:
        return self.computer(self._actions[key])

    def patch_hashes(self, file: Path) -> None:
        """Write the input digests over their placeholders in `file`'s header."""
        for running in self.pending:
            running.patch(file)

    def hashed_recipe(self) -> MergeRecipe:
        """The recipe with every input's real sha256 (waits for running hashes)."""
        digests = {running.placeholder: running.digest() for running in self.pending}
        return replace(self.recipe, inputs=[replace(item, sha256=digests.get(item.sha256, item.sha256))
                                            for item in self.recipe.inputs])

    def cost(self, key: str) -> int:
        """Memory a key holds while computed ahead: its output and its mapped inputs."""
        action = self._actions[key]
        return action.nbytes * (1 + len(action.sources))

    def __post_init__(self) -> None:
        self._actions = {action.key: action for action in self.plan.actions}


@dataclass(frozen=True)
class _Settings:
    method: MergeMethod
    params: dict[str, Any]


def merge_models(recipe: MergeRecipe, output: str | Path | None = None, *,
                 overwrite: bool = False, threads: int | None = None,
                 progress: ProgressCallback | None = None) -> MergeResult:
    """Merge the recipe's inputs into one safetensors file (atomically; nothing on failure).

    `threads` keys (default 2) are computed ahead of the writer in parallel; the output
    bytes do not depend on it. `progress(n)` is called with the bytes of each tensor as
    it is written.
    """
    from sdkit.io.lazy import LazyTensor
    from sdkit.io.writer import write_safetensors

    target = _output_path(recipe, output)
    check_output_path(target, [item.path for item in recipe.inputs], force=overwrite)
    with prepare_merge(recipe, target) as prepared:
        metadata = merge_metadata(prepared.recipe, prepared.facts, target)
        tensors = {action.key: LazyTensor(action.dtype, action.shape, partial(prepared.compute, action.key),
                                          chunks=prepared.computer.pieces(action))
                   for action in prepared.plan.actions}
        with single_threaded_torch():
            write_safetensors(target, tensors, metadata, overwrite=overwrite, progress=progress,
                              workers=DEFAULT_WORKERS if threads is None else threads, cost=prepared.cost,
                              finish=prepared.patch_hashes)
        return MergeResult(target, prepared.hashed_recipe(), prepared.plan.report,
                           dict(prepared.computer.non_finite.counts), prepared.plan.output_bytes)


@contextmanager
def prepare_merge(recipe: MergeRecipe, target: Path, *,
                  check_disk: bool = True) -> Iterator[PreparedMerge]:
    """Open and check everything, plan every key; inputs stay open inside the `with`."""
    with ExitStack() as stack:
        yield _prepare(recipe, target, stack, check_disk)


def _prepare(recipe: MergeRecipe, target: Path, stack: ExitStack, check_disk: bool) -> PreparedMerge:
    settings = _method_settings(recipe)
    models = open_inputs(recipe.inputs, stack)
    # hashing reads every input in full; unless the recipe names the digests its inputs
    # must have, it starts now and runs beside everything else (from the checks and the
    # import of torch to the writing); a refused merge stops it at its next chunk
    pending: list[BackgroundHash] = []
    if not any(given.sha256 for given in recipe.inputs):
        pending = start_hashes(models)
        stack.callback(lambda: [running.cancel() for running in pending])
    inputs = [aligned_input(input_letter(i), model) for i, model in enumerate(models)]
    identities = [mergeable_identity(model) for model in models]
    check_same_family(models, identities)
    layout = model_block_layout(identities[0].family, (key for model in inputs for key in model.infos))
    weights = _key_weights(recipe, settings, inputs, layout)
    sources = _component_sources(recipe, inputs, settings.method, layout)
    plan = build_plan(inputs, settings.method, settings.params, weights, sources,
                      recipe.dtype_code)
    if check_disk:
        _check_disk_space(target, plan.output_bytes)
    if pending:
        hashes = [InputHashes(running.placeholder, legacy_hash(model)) for running, model in zip(pending, models)]
    else:  # checked against the recipe before any work
        hashes = hash_inputs(models)
    facts = [input_facts(aligned.name, model, identity, hashed, given.sha256)
             for aligned, model, identity, hashed, given
             in zip(inputs, models, identities, hashes, recipe.inputs)]
    # every parameter recorded with its effective value: a replay must not depend on
    # the defaults of the sdkit version that replays it
    recipe = replace(recipe, inputs=[RecipeInput(f.path, f.sha256) for f in facts],
                     params=dict(settings.params), blocks=_recorded_blocks(recipe, weights))
    computer = KeyComputer(inputs, settings.method, settings.params, str(target),
                           allow_nan=recipe.allow_nan)
    return PreparedMerge(recipe, inputs, facts, plan, computer, pending)


def _output_path(recipe: MergeRecipe, output: str | Path | None) -> Path:
    chosen = output if output is not None else recipe.output
    if chosen is None:
        raise SdkitError("merge: no output path (give -o/--output)")
    target = Path(chosen)
    if target.suffix.lower() not in (".safetensors", ".sft"):
        raise SdkitError(f"{target}: merges are written as .safetensors")
    return target


def _method_settings(recipe: MergeRecipe) -> _Settings:
    method = get_method(recipe.method)
    method.check_inputs(len(recipe.inputs))
    params = method.resolve_params(recipe.params)
    method.check_params(params)
    source = method.source_index(params)
    if source is not None and source >= len(recipe.inputs):
        raise SdkitError(f"merge method {method.name}: no input {input_letter(source)} "
                         f"(inputs: A–{input_letter(len(recipe.inputs) - 1)})")
    if not method.has_alpha and (recipe.blocks or recipe.components):
        raise SdkitError(f"merge method {method.name} has no alpha, so block and component "
                         "weights do not apply")
    return _Settings(method, params)


def _key_weights(recipe: MergeRecipe, settings: _Settings, inputs: Sequence[AlignedInput],
                 layout: Layout) -> KeyWeights:
    alpha = float(settings.params.get(BLEND_PARAM, 0.0))
    present = _components_present(inputs, layout)
    _require_components(recipe.components or {}, present, "a component weight")
    if recipe.blocks and "unet" not in present:
        raise SdkitError("merge: block weights need a diffusion model (UNet or transformer), "
                         "and no input has one")
    return KeyWeights(alpha=alpha, components=resolve_components(recipe.components),
                      blocks=resolve_blocks(recipe.blocks, layout), layout=layout)


def _recorded_blocks(recipe: MergeRecipe, weights: KeyWeights) -> Any:
    """A preset is recorded as the values it gave, so a replay does not depend on the
    preset tables of the sdkit version that replays it."""
    if isinstance(recipe.blocks, str):
        return [weights.blocks[block] for block in weights.layout.ids]
    return recipe.blocks


def _component_sources(recipe: MergeRecipe, inputs: Sequence[AlignedInput],
                       method: MergeMethod, layout: Layout) -> dict[str, Any]:
    """Component -> MERGE or input index, as the recipe's `take` says. When the method
    merges, a checkpoint's VAE comes from A unless asked otherwise (a lone VAE merges)."""
    present = _components_present(inputs, layout)
    _require_components(recipe.take, present, "--take")
    sources: dict[str, Any] = {}
    if method.copies_input is None and "vae" in present and present & {"unet", *TEXT_ENCODERS}:
        sources["vae"] = 0
    for name, value in recipe.take.items():
        choice = MERGE if value.strip().lower() == MERGE else input_index(value)
        if choice != MERGE and choice >= len(inputs):
            raise SdkitError(f"take {name}={value}: there is no input {value} "
                             f"(inputs: A–{input_letter(len(inputs) - 1)})")
        for component in component_names(name):
            sources[component] = choice
    return sources


# a lone transformer diffusion model (FLUX.1, Wan, …) holds one component, its diffusion model
_TRANSFORMER_HINT = (" (a diffusion model file holds only the diffusion model, component unet; "
                     "its blocks: sdkit merge --list-blocks FAMILY)")


def _components_present(inputs: Sequence[AlignedInput], layout: Layout) -> set[str]:
    return {layout.component_of(key) for model in inputs for key in model.infos}


def _require_components(named: Mapping[str, Any], present: set[str], what: str) -> None:
    """A setting naming a component no input holds would silently do nothing: refuse it."""
    for name in named:
        if not set(component_names(name)) & present:
            raise SdkitError(f"merge: {what} for {name}, but no input has {name} keys"
                             + (_TRANSFORMER_HINT if present == {"unet"} else ""))


def _check_disk_space(target: Path, output_bytes: int) -> None:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SdkitError(f"{folder}: output folder does not exist")
    free = shutil.disk_usage(folder).free
    needed = output_bytes + HEADER_ALLOWANCE
    if free < needed:
        raise SdkitError(f"{target}: needs {needed / 2**30:.2f} GiB free, "
                         f"{folder} has {free / 2**30:.2f} GiB")
