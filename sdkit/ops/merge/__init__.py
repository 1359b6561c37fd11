"""Checkpoint merging: named methods, per-block and per-component weights, streaming
output, replayable recipes.

    from sdkit.ops.merge import MergeRecipe, RecipeInput, merge_models
    recipe = MergeRecipe([RecipeInput("a.safetensors"), RecipeInput("b.safetensors")],
                         "weighted_sum", params={"alpha": 0.3})
    merge_models(recipe, "out.safetensors")

A recipe in named steps (`MultiStepRecipe`, read by `load_recipe_file`) merges the same
way, key by key through its steps, writing only the step it names.
"""

from sdkit.ops.merge import methods  # noqa: F401  (registers the built-in methods)
from sdkit.ops.merge.engine import MergeResult, merge_models, prepare_merge
from sdkit.ops.merge.plan import PlanReport
from sdkit.ops.merge.recipe import (
    MergeRecipe,
    RecipeInput,
    load_recipe_file,
    recipe_from_metadata,
)
from sdkit.ops.merge.registry import METHODS, MergeMethod, get_method, merge_method
from sdkit.ops.merge.replay import ReplayResult, replay_into, replay_merge
from sdkit.ops.merge.steps import MultiStepRecipe

__all__ = [
    "METHODS", "MergeMethod", "MergeRecipe", "MergeResult", "MultiStepRecipe", "PlanReport", "RecipeInput",
    "ReplayResult", "get_method", "load_recipe_file", "merge_method", "merge_models",
    "prepare_merge", "recipe_from_metadata", "replay_into", "replay_merge",
]
