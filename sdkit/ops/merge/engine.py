"""Running a merge recipe: open, check, plan, then stream the output key by key.

Inputs are opened lazily (headers only; tensors memory-mapped when a key is computed),
every check runs before the first byte is written (method and parameters, model kinds
and families, shapes, block names, disk space), and the output is written through the
streaming writer with one LazyTensor per key whose `load` computes that key's merge. So
peak memory is a few tensors, whatever the model size and the number of inputs.

A recipe in steps is prepared by `chain.prepare_chain` from the same parts (method
settings, `plan_step`, input hashes and facts), one step after another.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit.arch.blocks import TEXT_ENCODERS, Layout, model_block_layout
from sdkit.errors import SdkitError
from sdkit.io.ahead import DEFAULT_WORKERS, single_threaded_torch
from sdkit.io.output_path import check_output_path
from sdkit.ops.block_weights import (
    KeyWeights,
    component_names,
    resolve_blocks,
    resolve_components,
)
from sdkit.ops.merge.align import (
    aligned_input,
    check_same_family,
    input_facts,
    mergeable_identity,
    open_inputs,
)
from sdkit.ops.merge.compute import KeyComputer
from sdkit.ops.merge.hashes import InputHashes, hash_inputs, legacy_hash, start_hashes
from sdkit.ops.merge.plan import MERGE, AlignedInput, MergePlan, PlanReport, build_plan
from sdkit.ops.merge.provenance import InputFacts, merge_metadata
from sdkit.ops.merge.recipe import MergeRecipe, RecipeInput
from sdkit.ops.merge.registry import (
    BLEND_PARAM,
    MergeMethod,
    get_method,
    input_index,
    input_letter,
)
from sdkit.ops.recipe_meta import BackgroundHash

if TYPE_CHECKING:
    from sdkit.arch.identity import Identity

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

    recipe: Any  # MergeRecipe, or steps.MultiStepRecipe
    inputs: list[AlignedInput]
    facts: list[InputFacts]  # of every input file
    plan: MergePlan
    computer: KeyComputer
    pending: list[BackgroundHash] = field(default_factory=list)  # input hashes still running

    def compute(self, key: str) -> Any:
        return self.computer(self._actions[key])

    def patch_hashes(self, file: Path) -> None:
        """Write the input digests over their placeholders in `file`'s header."""
        for running in self.pending:
            running.patch(file)

    def hashed_recipe(self) -> Any:
        """The recipe with every input's real sha256 (waits for running hashes)."""
        return self.recipe.with_digests({running.placeholder: running.digest() for running in self.pending})

    def cost(self, key: str) -> int:
        """Memory a key holds while computed ahead: its output and its mapped inputs."""
        action = self._actions[key]
        return action.nbytes * (1 + len(action.sources))

    def __post_init__(self) -> None:
        self._actions = {action.key: action for action in self.plan.actions}


@dataclass(frozen=True)
class MethodSettings:
    method: MergeMethod
    params: dict[str, Any]


def merge_models(recipe: Any, output: str | Path | None = None, *,
                 overwrite: bool = False, threads: int | None = None,
                 progress: ProgressCallback | None = None) -> MergeResult:
    """Merge the recipe's inputs into one safetensors file (atomically; nothing on failure).
    `recipe` is a MergeRecipe or a steps.MultiStepRecipe (whose written step is made
    key by key from the input files, its earlier steps on the way, nothing else written).

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
def prepare_merge(recipe: Any, target: Path, *,
                  check_disk: bool = True) -> Iterator[PreparedMerge]:
    """Open and check everything, plan every key; inputs stay open inside the `with`."""
    from sdkit.ops.merge.chain import prepare_chain
    from sdkit.ops.merge.steps import MultiStepRecipe

    with ExitStack() as stack:
        if isinstance(recipe, MultiStepRecipe):
            prepared = prepare_chain(recipe, target, stack)
        else:
            prepared = _prepare(recipe, target, stack)
        if check_disk:
            _check_disk_space(target, prepared.plan.output_bytes)
        yield prepared


def _prepare(recipe: MergeRecipe, target: Path, stack: ExitStack) -> PreparedMerge:
    settings = method_settings(recipe)
    models = open_inputs(recipe.inputs, stack)
    pending = hash_in_background(recipe.inputs, models, stack)
    inputs = [aligned_input(input_letter(i), model) for i, model in enumerate(models)]
    identities = [mergeable_identity(model) for model in models]
    check_same_family(models, identities)
    plan, weights = plan_step(recipe, settings, inputs, identities)
    facts = file_facts(recipe.inputs, models, identities, pending, [i.name for i in inputs])
    recipe = recorded_step(recipe, settings, weights)
    recipe = replace(recipe, inputs=[RecipeInput(f.path, f.sha256) for f in facts])
    computer = KeyComputer(inputs, settings.method, settings.params, str(target),
                           allow_nan=recipe.allow_nan)
    return PreparedMerge(recipe, inputs, facts, plan, computer, pending)


def hash_in_background(given: Sequence[RecipeInput], models: Sequence[Any],
                       stack: ExitStack) -> list[BackgroundHash]:
    """Hashing reads every input in full; unless the recipe names the digests its inputs
    must have, it starts now and runs beside everything else (from the checks and the
    import of torch to the writing); a refused merge stops it at its next chunk."""
    if any(item.sha256 for item in given):
        return []
    pending = start_hashes(models)
    stack.callback(lambda: [running.cancel() for running in pending])
    return pending


def file_facts(given: Sequence[RecipeInput], models: Sequence[Any], identities: Sequence[Identity],
               pending: Sequence[BackgroundHash], names: Sequence[str]) -> list[InputFacts]:
    """What provenance records of each input file (their hashes running, or computed and
    checked against the recipe's now, before any work)."""
    if pending:
        hashes = [InputHashes(running.placeholder, legacy_hash(model)) for running, model in zip(pending, models)]
    else:
        hashes = hash_inputs(models)
    return [input_facts(name, model, identity, hashed, item.sha256)
            for name, model, identity, hashed, item in zip(names, models, identities, hashes, given)]


def plan_step(recipe: MergeRecipe, settings: MethodSettings, inputs: Sequence[AlignedInput],
              identities: Sequence[Identity]) -> tuple[MergePlan, KeyWeights]:
    """The action for every key of one merge, and the weight of each key."""
    layout = model_block_layout(identities[0].family, (key for model in inputs for key in model.infos))
    weights = _key_weights(recipe, settings, inputs, layout)
    sources = _component_sources(recipe, inputs, settings.method, layout)
    plan = build_plan(inputs, settings.method, settings.params, weights, sources, recipe.dtype_code)
    return plan, weights


def recorded_step(recipe: MergeRecipe, settings: MethodSettings, weights: KeyWeights) -> MergeRecipe:
    """Every parameter recorded with its effective value: a replay must not depend on the
    defaults of the sdkit version that replays it."""
    return replace(recipe, params=dict(settings.params), blocks=_recorded_blocks(recipe, weights))


def _output_path(recipe: MergeRecipe, output: str | Path | None) -> Path:
    chosen = output if output is not None else recipe.output
    if chosen is None:
        raise SdkitError("merge: no output path (give -o/--output)")
    target = Path(chosen)
    if target.suffix.lower() not in (".safetensors", ".sft"):
        raise SdkitError(f"{target}: merges are written as .safetensors")
    return target


def method_settings(recipe: MergeRecipe) -> MethodSettings:
    """The recipe's method and its parameters, checked."""
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
    return MethodSettings(method, params)


def _key_weights(recipe: MergeRecipe, settings: MethodSettings, inputs: Sequence[AlignedInput],
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
