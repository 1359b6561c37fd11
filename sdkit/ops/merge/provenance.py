"""The metadata a merged file carries: sdkit's replayable recipe, the webui's provenance
keys and ModelSpec.

- `sdkit.recipe`: the recipe as JSON, inputs with their sha256, the sdkit version;
- `sd_merge_recipe` / `sd_merge_models`: the provenance format the AUTOMATIC1111 webui
  writes and Civitai reads (`type` says which tool merged; `sd_merge_models` maps each
  input's sha256 to its name, legacy hash and own recipe, plus the inputs' own
  `sd_merge_models`, so a chain of merges stays traceable);
- `modelspec.*`: Stability AI's model spec (architecture, implementation, title,
  resolution, `merged_from`, date, hash_sha256), and `format: pt` as the webui writes it.
  `SOURCE_DATE_EPOCH` fixes the date, so the same merge can give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.arch.families import FAMILIES, default_resolution, modelspec_architecture
from sdkit.io.writer import DATA_SHA256
from sdkit.ops.merge.recipe import RECIPE_KEY, MergeRecipe
from sdkit.ops.recipe_meta import LDM_IMPLEMENTATIONS, SPEC_VERSION, modelspec_date


@dataclass(frozen=True)
class InputFacts:
    """What provenance needs to know about one input."""

    name: str  # "A", "B", ...
    path: str
    kind: str
    sha256: str
    legacy_hash: str | None
    metadata: Mapping[str, str]
    family: str | None
    variant: str = "normal"
    prediction: str = "epsilon"
    nonstandard: bool = False  # dimensions differ from the family's: its size is not the family's


def merge_metadata(recipe: Any, inputs: Sequence[InputFacts], output: Path) -> dict[str, str]:
    """All metadata keys for the output file of `recipe` (a MergeRecipe or a
    MultiStepRecipe: the webui's keys then describe its written step, over all its input
    files)."""
    metadata = {"format": "pt", RECIPE_KEY: json.dumps(recipe.to_json(stored=True), sort_keys=True)}
    metadata["sd_merge_recipe"] = json.dumps(_webui_recipe(recipe.written_step, inputs))
    metadata["sd_merge_models"] = json.dumps(_webui_models(inputs))
    metadata.update(_modelspec(inputs, output))
    return metadata


def _webui_recipe(recipe: MergeRecipe, inputs: Sequence[InputFacts]) -> dict[str, Any]:
    hashes = [facts.sha256 for facts in inputs] + [None, None, None]
    return {
        "type": "sdkit",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": recipe.method,
        "multiplier": recipe.params.get("alpha"),
        "save_as_half": recipe.dtype == "fp16",
        "blocks": recipe.blocks,
        "components": recipe.components or None,
        "take": recipe.take or None,
        "params": recipe.params,
        "is_inpainting": any(f.variant == "inpaint" for f in inputs[:1]),
        "is_instruct_pix2pix": any(f.variant == "pix2pix" for f in inputs[:1]),
    }


def _webui_models(inputs: Sequence[InputFacts]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for facts in inputs:
        models[facts.sha256] = {
            "name": Path(facts.path).name,
            "legacy_hash": facts.legacy_hash,
            "sd_merge_recipe": _json_or_none(facts.metadata.get("sd_merge_recipe")),
        }
        earlier = _json_or_none(facts.metadata.get("sd_merge_models"))
        if isinstance(earlier, dict):
            models.update(earlier)
    return models


def _json_or_none(text: str | None) -> Any:
    from sdkit.io.safetensors_json import metadata_json  # bounded: inputs are untrusted

    return metadata_json(text)


def _modelspec(inputs: Sequence[InputFacts], output: Path) -> dict[str, str]:
    first = inputs[0]
    spec = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.title": output.stem,
        "modelspec.merged_from": ", ".join(_title(facts) for facts in inputs),
        "modelspec.date": modelspec_date(),
        "modelspec.hash_sha256": DATA_SHA256,
    }
    family = first.family if first.family in FAMILIES else None
    architecture = (first.metadata.get("modelspec.architecture")
                    or (modelspec_architecture(family, variant=first.variant,
                                               prediction=first.prediction) if family else None))
    if architecture:
        spec["modelspec.architecture"] = architecture
    implementation = first.metadata.get("modelspec.implementation") or LDM_IMPLEMENTATIONS.get(family or "")
    if implementation:
        spec["modelspec.implementation"] = implementation
    resolution = first.metadata.get("modelspec.resolution")
    if family and not resolution and not first.nonstandard:
        side = default_resolution(family, prediction=first.prediction)
        resolution = f"{side}x{side}"
    if resolution:
        spec["modelspec.resolution"] = resolution
    if family and first.prediction in ("epsilon", "v"):
        spec["modelspec.prediction_type"] = first.prediction
    return spec


def _title(facts: InputFacts) -> str:
    title = facts.metadata.get("modelspec.title") or Path(facts.path).stem
    return title.replace(",", " ")
