"""A merge in named steps: each step is a one-step merge whose inputs are files or the
outputs of other steps, and one step's result is written.

    steps:
      style: {method: add_difference, inputs: [base.safetensors, tuned.safetensors, orig.safetensors]}
      mix:   {method: weighted_sum, inputs: [style, other.safetensors], params: {alpha: 0.3}}
      final: {method: ties, inputs: [base.safetensors, mix, third.safetensors], dtype: fp16}
    output: final                  # the step written (default: the last one)
    output_file: merged.safetensors  # optional, the command line's -o wins

An input naming a step (or written {step: NAME}) is that step's output; anything else is
a path, or {path, sha256}. Each step takes every option of a one-step recipe (params,
blocks, components, take, dtype, allow_nan). The steps run in an order where each comes
after the steps it reads (the order written where it allows); a cycle, a step the
written one does not use, or an unknown step name is refused.

Stored in a merged file's `sdkit.recipe` with `steps` in that order, each input as
{path, sha256} or {step}, so `sdkit merge --replay` runs the whole chain again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdkit import __version__
from sdkit.errors import SdkitError
from sdkit.ops.merge.recipe import MergeRecipe, RecipeInput, StepInput

_FIELDS = {"steps", "output", "output_file", "operation", "sdkit_version"}
# a step name cannot be mistaken for a file: no dot, no folder separator
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass
class MultiStepRecipe:
    """Named merge steps, in the order they run; `final` is the step written."""

    steps: dict[str, MergeRecipe]
    final: str
    output: str | None = None  # the file written

    @property
    def written_step(self) -> MergeRecipe:
        return self.steps[self.final]

    @property
    def inputs(self) -> list[RecipeInput]:
        """Every input file, once, in the order the steps first name it."""
        seen: dict[str, RecipeInput] = {}
        for step in self.steps.values():
            for item in step.inputs:
                if isinstance(item, RecipeInput):
                    seen.setdefault(item.path, item)
        return list(seen.values())

    def map_files(self, change: Callable[[RecipeInput], RecipeInput]) -> MultiStepRecipe:
        """The recipe with every input file replaced by `change(file)`."""
        return replace(self, steps={name: step.map_files(change) for name, step in self.steps.items()})

    def with_digests(self, digests: Mapping[str, str]) -> MultiStepRecipe:
        return replace(self, steps={name: step.with_digests(digests) for name, step in self.steps.items()})

    def to_json(self, *, stored: bool = False) -> dict[str, Any]:
        steps = {}
        for name, step in self.steps.items():
            data = step.to_json(stored=stored)
            del data["operation"], data["sdkit_version"]
            steps[name] = data
        return {"operation": "merge", "sdkit_version": __version__, "steps": steps, "output": self.final}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str, base: Path | None = None) -> MultiStepRecipe:
        """Build from parsed YAML/JSON and check the steps form a chain; `base` is the
        folder relative input paths are taken from (where a name is told from a file)."""
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise SdkitError(f"{origin}: unknown recipe field {unknown[0]!r} (a recipe with steps "
                             "gives inputs, method and the other options in each step)")
        if data.get("operation", "merge") != "merge":
            raise SdkitError(f"{origin}: recipe is for {data['operation']!r}, not merge")
        given = data["steps"]
        if not isinstance(given, Mapping) or not given:
            raise SdkitError(f"{origin}: recipe field steps must be a mapping of step names to steps")
        names = [_step_name(name, origin) for name in given]
        steps = {}
        for name, step in zip(names, given.values()):
            where = f"{origin}: step {name}"
            _refuse_unknown_names(step, names, where, base)
            steps[name] = MergeRecipe.from_mapping(step, where, steps=names)
        final = str(data.get("output") or names[-1])
        if final not in steps:
            hint = "; the file to write is output_file, or -o" if "." in final or "/" in final else ""
            raise SdkitError(f"{origin}: output {final!r} is not a step (steps: {', '.join(names)}{hint})")
        order = run_order(steps, final, origin)
        output = data.get("output_file")
        return cls({name: steps[name] for name in order}, final, None if output is None else str(output))


def _step_name(name: Any, origin: str) -> str:
    text = str(name)
    if not _STEP_NAME.fullmatch(text):
        raise SdkitError(f"{origin}: step name {text!r} must be letters, digits, _ or - "
                         "(no dot or slash, so that it cannot be read as a file)")
    return text


def _refuse_unknown_names(step: Any, names: list[str], where: str, base: Path | None) -> None:
    """An input written like a step name (no dot, no slash) that is neither a step nor an
    existing file or folder is a misspelt step, not a missing file."""
    given = step.get("inputs") if isinstance(step, Mapping) else None
    for item in given if isinstance(given, list) else ():
        if not isinstance(item, str) or item in names or not _STEP_NAME.fullmatch(item):
            continue
        if not ((base or Path(".")) / item).exists():
            raise SdkitError(f"{where}: input {item!r} is neither a step nor a file "
                             f"(steps: {', '.join(names)})")


def run_order(steps: Mapping[str, MergeRecipe], final: str, origin: str) -> list[str]:
    """The steps in an order where each runs after those it reads, kept as written where
    that allows; refuses a cycle and a step the written one does not need."""
    reads = {name: [i.step for i in step.inputs if isinstance(i, StepInput)] for name, step in steps.items()}
    for name, earlier in reads.items():
        if name in earlier:
            raise SdkitError(f"{origin}: step {name} reads its own output")
    needed = _needed_by(final, reads)
    for name in steps:
        if name not in needed:
            raise SdkitError(f"{origin}: step {name} is not used by the output step {final} "
                             "(remove it, or name the step to write with output:)")
    order: list[str] = []
    while len(order) < len(steps):
        ready = [name for name in steps if name not in order and all(r in order for r in reads[name])]
        if not ready:
            raise SdkitError(f"{origin}: steps form a cycle: {' → '.join(_cycle(reads, order))}")
        order.append(ready[0])
    return order


def _needed_by(final: str, reads: Mapping[str, list[str]]) -> set[str]:
    needed, todo = set(), [final]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(reads[name])
    return needed


def _cycle(reads: Mapping[str, list[str]], done: list[str]) -> list[str]:
    """One cycle among the steps not yet ordered, its first step repeated at the end."""
    path = [next(name for name in reads if name not in done)]
    while True:
        following = next(r for r in reads[path[-1]] if r not in done)
        if following in path:
            return path[path.index(following):] + [following]
        path.append(following)
