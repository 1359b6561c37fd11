"""A merge written down: inputs, method, parameters, weights, output dtype.

The same structure is read from a YAML recipe file (`sdkit merge --recipe r.yaml`) and
stored as JSON in the output's `sdkit.recipe` metadata (with each input's sha256 and the
sdkit version), which is what `sdkit merge --replay FILE` runs again.

    inputs:                      # A, B, C... in order; a path or {path, sha256}
      - base.safetensors
      - {path: style.safetensors, sha256: 3f2a…}
    method: weighted_sum
    params: {alpha: 0.3}         # the method's parameters (see `sdkit merge --list-methods`)
    blocks: {BASE: 0, IN00: 0.5} # or a list, one value per block, or a preset (GRAD_V)
    components: {te: 0.7}        # per-component alpha
    take: {vae: B}               # component -> input to copy it from, or "merge"
    dtype: fp16                  # output dtype of float tensors; default: as the inputs
    allow_nan: false
    output: merged.safetensors   # optional, the command line's -o wins

A recipe of named steps, each one such merge reading files or earlier steps' results,
is a `steps.MultiStepRecipe`; `load_recipe_file` and `recipe_from_metadata` return
whichever the data holds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit import __version__
from sdkit.arch.block_presets import is_preset_name
from sdkit.errors import SdkitError
from sdkit.io.dtypes import NAME_TO_CODE
from sdkit.io.safetensors_json import metadata_json

if TYPE_CHECKING:
    from sdkit.ops.merge.steps import MultiStepRecipe

RECIPE_KEY = "sdkit.recipe"
_FIELDS = {"inputs", "method", "params", "blocks", "components", "take", "dtype",
           "allow_nan", "output", "sdkit_version", "operation"}
_STEP_FIELDS = {"inputs", "method", "params", "blocks", "components", "take", "dtype", "allow_nan"}


@dataclass(frozen=True)
class RecipeInput:
    path: str
    sha256: str | None = None

    def to_json(self, stored: bool) -> dict[str, Any]:
        from sdkit.ops.recipe_meta import recorded_path

        return {"path": recorded_path(self.path) if stored else self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class StepInput:
    """An input that is the output of an earlier step of a multi-step recipe."""

    step: str

    def to_json(self, stored: bool) -> dict[str, Any]:
        return {"step": self.step}


@dataclass
class MergeRecipe:
    """Everything that determines a merge's output tensors."""

    inputs: list[RecipeInput | StepInput]  # StepInput only inside a multi-step recipe
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, float] | list[float] | str | None = None  # str: a preset name
    components: dict[str, float] = field(default_factory=dict)
    take: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None
    allow_nan: bool = False
    output: str | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) < 1:
            raise SdkitError("merge recipe: no inputs")
        if self.dtype is not None and self.dtype not in ("fp16", "bf16", "fp32"):
            raise SdkitError(f"merge recipe: dtype must be fp16, bf16 or fp32, got {self.dtype!r}")

    @property
    def dtype_code(self) -> str | None:
        return NAME_TO_CODE[self.dtype] if self.dtype else None

    @property
    def written_step(self) -> MergeRecipe:
        """The merge whose result is written (a multi-step recipe names one of its steps)."""
        return self

    def map_files(self, change: Callable[[RecipeInput], RecipeInput]) -> MergeRecipe:
        """The recipe with every input file replaced by `change(file)`."""
        return replace(self, inputs=[change(item) if isinstance(item, RecipeInput) else item
                                     for item in self.inputs])

    def with_digests(self, digests: Mapping[str, str]) -> MergeRecipe:
        """The recipe with each input's sha256 looked up in `digests` (placeholder -> digest)."""
        return self.map_files(lambda item: replace(item, sha256=digests.get(item.sha256 or "", item.sha256)))

    def to_json(self, *, stored: bool = False) -> dict[str, Any]:
        """The recipe as JSON (inputs with their sha256 when known); `stored`: the form a
        merged file's metadata keeps, inputs named as `recorded_path` names them."""
        return {
            "operation": "merge",
            "sdkit_version": __version__,
            "inputs": [item.to_json(stored) for item in self.inputs],
            "method": self.method,
            "params": dict(self.params),
            "blocks": self.blocks,
            "components": dict(self.components),
            "take": dict(self.take),
            "dtype": self.dtype,
            "allow_nan": self.allow_nan,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str, *,
                     steps: Collection[str] | None = None) -> MergeRecipe:
        """Build from parsed YAML/JSON, refusing unknown fields and wrong types. `steps`:
        the step names of a multi-step recipe, which this one is a step of (an input
        naming one of them, or given as {step: NAME}, is that step's output)."""
        if not isinstance(data, Mapping):
            raise SdkitError(f"{origin}: a merge recipe must be a mapping")
        unknown = sorted(set(data) - (_FIELDS if steps is None else _STEP_FIELDS))
        if unknown:
            raise SdkitError(f"{origin}: unknown recipe field {unknown[0]!r}")
        if data.get("operation", "merge") != "merge":
            raise SdkitError(f"{origin}: recipe is for {data['operation']!r}, not merge")
        if "method" not in data or "inputs" not in data:
            raise SdkitError(f"{origin}: a merge recipe needs `inputs` and `method`")
        return cls(
            inputs=[_recipe_input(item, origin, steps) for item in _as_list(data["inputs"], "inputs", origin)],
            method=str(data["method"]),
            params=dict(_as_map(data.get("params"), "params", origin)),
            blocks=_blocks(data.get("blocks"), origin),
            components={str(k): float(v) for k, v in _as_map(data.get("components"), "components", origin).items()},
            take={str(k): str(v) for k, v in _as_map(data.get("take"), "take", origin).items()},
            dtype=data.get("dtype"),
            allow_nan=bool(data.get("allow_nan", False)),
            output=data.get("output"),
        )


def _as_list(value: Any, name: str, origin: str) -> list[Any]:
    if not isinstance(value, list):
        raise SdkitError(f"{origin}: recipe field {name} must be a list")
    return value


def _as_map(value: Any, name: str, origin: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SdkitError(f"{origin}: recipe field {name} must be a mapping")
    return value


def _recipe_input(item: Any, origin: str, steps: Collection[str] | None) -> RecipeInput | StepInput:
    if isinstance(item, str):
        return StepInput(item) if steps is not None and item in steps else RecipeInput(item)
    if isinstance(item, Mapping) and set(item) == {"step"} and steps is not None:
        if str(item["step"]) not in steps:
            raise SdkitError(f"{origin}: no step named {str(item['step'])!r} (steps: {', '.join(steps)})")
        return StepInput(str(item["step"]))
    if isinstance(item, Mapping) and "path" in item:
        return RecipeInput(str(item["path"]), item.get("sha256"))
    raise SdkitError(f"{origin}: each recipe input is a path or {{path, sha256}}"
                     + (", or a step name" if steps is not None else "") + f", got {item!r}")


def _blocks(value: Any, origin: str) -> dict[str, float] | list[float] | str | None:
    if isinstance(value, str) and is_preset_name(value):
        return value.strip().upper()
    if value is None or isinstance(value, (list, Mapping)):
        try:
            if isinstance(value, list):
                return [float(v) for v in value]
            return {str(k): float(v) for k, v in value.items()} if value else None
        except (TypeError, ValueError):
            pass
    raise SdkitError(f"{origin}: recipe field blocks must be a list of numbers, NAME: number or a preset name")


def load_recipe_file(path: str | Path) -> MergeRecipe | MultiStepRecipe:
    """A recipe from a YAML (or JSON) file, of one merge or of named steps (`steps:`);
    relative input paths are taken from its folder."""
    import yaml

    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SdkitError(f"{source}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SdkitError(f"{source}: not valid YAML ({_first_line(exc)})") from None
    base = source.parent
    recipe = _from_mapping(data, str(source), base)
    recipe = recipe.map_files(lambda item: replace(item, path=_relative_to(item.path, base)))
    if recipe.output is not None:
        recipe.output = _relative_to(recipe.output, base)
    return recipe


def _from_mapping(data: Any, origin: str, base: Path | None = None) -> MergeRecipe | MultiStepRecipe:
    if isinstance(data, Mapping) and "steps" in data:
        from sdkit.ops.merge.steps import MultiStepRecipe

        return MultiStepRecipe.from_mapping(data, origin, base)
    return MergeRecipe.from_mapping(data, origin)


def _relative_to(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else base / candidate)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


def recipe_from_metadata(metadata: Mapping[str, str], origin: str) -> MergeRecipe | MultiStepRecipe:
    """The recipe stored in a merged file's metadata."""
    text = metadata.get(RECIPE_KEY)
    if text is None:
        raise SdkitError(f"{origin}: no {RECIPE_KEY} in its metadata (not merged by sdkit)")
    data = metadata_json(text)  # bounded: the file may be anyone's
    if data is None:
        raise SdkitError(f"{origin}: {RECIPE_KEY} metadata is not valid JSON (or too large to be a recipe)")
    return _from_mapping(data, origin)
