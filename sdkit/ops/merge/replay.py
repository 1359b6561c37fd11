"""Replaying the recipe stored in a merged file: checking the result is identical, or
writing it again.

The inputs are found at the paths the recipe recorded (file names, unless the merge was
made with `--record-paths`), beside the merged file, or among the files whose sha256 this
machine remembers, and must have the recorded sha256. `replay_merge` computes every
tensor again and compares it bit for bit with the stored one, writing nothing;
`replay_into` runs the recipe as a merge into a new file (atomically, with the metadata a
direct merge writes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdkit.errors import SdkitError
from sdkit.io.ahead import AHEAD_BUDGET, Prefetcher, single_threaded_torch
from sdkit.ops.merge.engine import MergeResult, merge_models, prepare_merge
from sdkit.ops.merge.recipe import MergeRecipe, RecipeInput, recipe_from_metadata
from sdkit.ops.merge.steps import MultiStepRecipe


@dataclass
class ReplayResult:
    path: Path
    recipe: MergeRecipe | MultiStepRecipe
    matched: int = 0
    different: list[str] = field(default_factory=list)  # same key, other dtype/shape/bytes
    missing: list[str] = field(default_factory=list)  # the replay makes it, the file lacks it
    extra: list[str] = field(default_factory=list)  # the file has it, the replay does not

    @property
    def identical(self) -> bool:
        return not (self.different or self.missing or self.extra)


def stored_recipe(merged_path: Path, metadata: dict[str, str]) -> MergeRecipe | MultiStepRecipe:
    """The recipe recorded in a merged file, its inputs located on this machine."""
    recipe = recipe_from_metadata(metadata, str(merged_path))
    return recipe.map_files(lambda item: _locate(item, merged_path))


def replay_into(path: str | Path, output: str | Path, *, overwrite: bool = False, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> MergeResult:
    """Run the merge recorded in `path` again, writing its result to `output`."""
    from sdkit.io import open_model

    merged_path = Path(path)
    with open_model(merged_path) as merged:
        recipe = stored_recipe(merged_path, merged.metadata)
    return merge_models(recipe, output, overwrite=overwrite, threads=threads, progress=progress)


def replay_merge(path: str | Path, *, threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Re-run the merge recorded in `path` and compare every tensor with the stored one."""
    from sdkit.io import open_model

    merged_path = Path(path)
    with open_model(merged_path) as merged:
        recipe = stored_recipe(merged_path, merged.metadata)
        with prepare_merge(recipe, merged_path, check_disk=False) as prepared:
            result = ReplayResult(merged_path, recipe)
            planned = prepared.plan.actions
            result.missing = [a.key for a in planned if a.key not in merged.infos]
            present = [a for a in planned if a.key in merged.infos]
            result.extra = sorted(set(merged.infos) - {a.key for a in planned})
            ahead = Prefetcher(prepared.compute, threads, cost=prepared.cost, budget=AHEAD_BUDGET)
            with single_threaded_torch(), ahead.start([a.key for a in present]):
                for action in present:
                    if _same_bytes(ahead.get(action.key), merged.load(action.key)):
                        result.matched += 1
                    else:
                        result.different.append(action.key)
                    if progress is not None:
                        progress(action.nbytes)
    return result


def _locate(item: RecipeInput, merged_path: Path) -> RecipeInput:
    """Where an input is now: at the recorded path (a name is taken from the working
    folder), beside the merged file, or any file this machine hashed with its sha256."""
    from sdkit.io.hash_cache import files_with_digest

    recorded = Path(item.path)
    candidates = [recorded, merged_path.parent / recorded.name]
    if item.sha256:
        candidates += files_with_digest("sha256", item.sha256)
    for candidate in candidates:
        if candidate.is_file() or (candidate.is_dir() and candidate == recorded):
            return replace(item, path=str(candidate))
    raise SdkitError(f"{recorded}: input of {merged_path.name} not found (recorded by name: put it "
                     "beside the merged file)")


def _same_bytes(ours: torch.Tensor, stored: torch.Tensor) -> bool:
    if ours.dtype != stored.dtype or tuple(ours.shape) != tuple(stored.shape):
        return False
    flat_ours = ours.contiguous().reshape(-1).view(torch.uint8)
    flat_stored = stored.contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(flat_ours, flat_stored))
