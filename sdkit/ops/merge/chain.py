"""Preparing a merge in steps: each step planned over the input files and the outputs of
the steps before it, none of which is ever written.

Every input file is opened and hashed once, whichever steps name it. To the steps that
read it, a step's output looks like a file: its keys, dtypes and shapes are those of its
plan, its identity is what `identify` makes of them with the metadata its merge would
write, and its tensors are made when they are read. A merged key of a later step reads an
earlier step's key slice by slice, cast to that step's dtype on the way (a TIES, DARE or
SLERP step reads it once per pass, the earlier step making it again each time), so each
key of the written step is made from slices of the input files through every step it
depends on, and has the bytes that running the steps one by one, writing each result and
merging from it, would give.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError
from sdkit.io.model_file import ModelFile, TensorInfo
from sdkit.ops.merge.align import (
    aligned_input,
    check_same_family,
    input_facts,
    mergeable_identity,
    open_inputs,
)
from sdkit.ops.merge.compute import KeyComputer
from sdkit.ops.merge.engine import (
    PreparedMerge,
    file_facts,
    hash_in_background,
    method_settings,
    plan_step,
    recorded_step,
)
from sdkit.ops.merge.hashes import InputHashes
from sdkit.ops.merge.plan import AlignedInput, MergePlan
from sdkit.ops.merge.provenance import InputFacts, merge_metadata
from sdkit.ops.merge.recipe import MergeRecipe, RecipeInput
from sdkit.ops.merge.registry import input_letter
from sdkit.ops.merge.steps import MultiStepRecipe

if TYPE_CHECKING:
    from sdkit.arch.identity import Identity


@dataclass
class _Member:
    """One input of a step, as the step sees it."""

    model: ModelFile
    identity: Identity
    aligned: AlignedInput


@dataclass
class _Step:
    """A planned step: its output as a file would show it, and how to make its keys."""

    model: ModelFile
    identity: Identity
    plan: MergePlan
    computer: KeyComputer

    def as_input(self, letter: str) -> _Member:
        actions = {action.key: action for action in self.plan.actions}
        aligned = AlignedInput(letter, str(self.model.path), dict(self.model.infos), self.model.load,
                               slices=lambda key: self.computer.output_reader(actions[key]))
        return _Member(self.model, self.identity, aligned)


def prepare_chain(recipe: MultiStepRecipe, target: Path, stack: ExitStack) -> PreparedMerge:
    """Open and check every step's inputs and plan every step; the written step's keys
    are then made on demand."""
    settings = {}
    for name, step in recipe.steps.items():
        with _step_errors(name):
            settings[name] = method_settings(step)
    files = _distinct_files(recipe)
    models = open_inputs(files, stack)
    pending = hash_in_background(files, models, stack)
    identities = [mergeable_identity(model) for model in models]
    opened = {_where(item): (model, identity) for item, model, identity in zip(files, models, identities)}
    made: dict[str, _Step] = {}
    recorded: dict[str, MergeRecipe] = {}
    for name, step in recipe.steps.items():
        with _step_errors(name):
            members = [made[item.step].as_input(input_letter(index)) if not isinstance(item, RecipeInput)
                       else _file_member(input_letter(index), *opened[_where(item)])
                       for index, item in enumerate(step.inputs)]
            check_same_family([m.model for m in members], [m.identity for m in members])
            plan, weights = plan_step(step, settings[name], [m.aligned for m in members],
                                      [m.identity for m in members])
            output = str(target) if name == recipe.final else f"step {name}"
            computer = KeyComputer([m.aligned for m in members], settings[name].method, settings[name].params,
                                   output, allow_nan=step.allow_nan)
            made[name] = _planned(name, step, members, plan, computer)
            recorded[name] = recorded_step(step, settings[name], weights)
    facts = file_facts(files, models, identities, pending, [input_letter(i) for i in range(len(files))])
    stored = {_where(item): RecipeInput(f.path, f.sha256) for item, f in zip(files, facts)}
    chain = replace(recipe, steps=recorded).map_files(lambda item: stored[_where(item)])
    final = made[recipe.final]
    return PreparedMerge(chain, list(final.computer.inputs), facts, final.plan, final.computer, pending)


def _distinct_files(recipe: MultiStepRecipe) -> list[RecipeInput]:
    """Each input file once (one named twice, or by two spellings, is opened once)."""
    seen: dict[Path, RecipeInput] = {}
    for item in recipe.inputs:
        seen.setdefault(_where(item), item)
    return list(seen.values())


def _where(item: RecipeInput) -> Path:
    return Path(item.path).expanduser().resolve()


def _file_member(letter: str, model: ModelFile, identity: Identity) -> _Member:
    return _Member(model, identity, aligned_input(letter, model))


def _planned(name: str, step: MergeRecipe, members: list[_Member], plan: MergePlan,
             computer: KeyComputer) -> _Step:
    """The step's output seen as the file a merge would write (tensors made when loaded),
    and what `identify` makes of it."""
    actions = {action.key: action for action in plan.actions}
    facts = [_unhashed_facts(m) for m in members]
    model = ModelFile(path=Path(f"step {name}"), format="memory",
                      infos={a.key: TensorInfo(a.key, a.dtype, a.shape) for a in plan.actions},
                      metadata=merge_metadata(step, facts, Path(f"{name}.safetensors")),
                      _loader=lambda key: computer(actions[key]))
    return _Step(model, mergeable_identity(model), plan, computer)


def _unhashed_facts(member: _Member) -> InputFacts:
    """Provenance facts of an input, for the metadata of a step's output (never written:
    only what identifies the model matters, not its hashes)."""
    return input_facts(member.aligned.name, member.model, member.identity, InputHashes("", None), None)


@contextmanager
def _step_errors(name: str) -> Iterator[None]:
    """A refusal inside a step says which step."""
    try:
        yield
    except SdkitError as exc:
        raise SdkitError(f"step {name}: {exc}") from None
