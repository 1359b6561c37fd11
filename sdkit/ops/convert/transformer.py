"""Convert a lone transformer denoiser between its single-file and diffusers layouts.

The file's keys are matched against its family's layouts (as `identify` does), which
measures the sizes and block counts the family's key map needs; the map's plan then
renames, cuts (q, k, v out of a fused `qkv`) and joins tensors lazily, one at a time, so
a 24 GB FLUX.1 converts in the memory of its largest tensor. Outputs:

- `--to single-file`: the original (BFL / Stability / ComfyUI) names with no prefix, as
  ComfyUI's diffusion-model loader reads them;
- `--to diffusers`: a folder (`config.json` + `diffusion_pytorch_model.safetensors`, loadable
  with the family's diffusers class) or, given a `.safetensors` path, the diffusers-named
  weights alone. The config follows from the weights and the release they match; a model
  of other sizes whose config the weights cannot complete needs `--config`.
"""

from __future__ import annotations

from pathlib import Path

from sdkit.arch.fingerprint import LayoutMatch, match_release, match_transformers
from sdkit.arch.keymaps import KeyPlan, KeyRecipe
from sdkit.arch.keymaps.transformer import check_config, diffusers_config, transformer_links, transformer_plan
from sdkit.arch.keyview import KeyView
from sdkit.errors import SdkitError
from sdkit.io import LazyTensor, ModelFile, lazy_tensors
from sdkit.ops.convert.model import ModelConversion, write_file
from sdkit.ops.folders import build_in_partial, write_component_folder
from sdkit.ops.layout import plan_tensors

_ROOT = "model.diffusion_model."
# precisions whose tensors are not plain values: cutting or joining them would tear scales
# from their weights, so they change layout only with a cast (which makes them plain first)
_PACKED_SCHEMES = {"scaled-fp8": "scaled fp8", "mixed": "mixed-quantized", "gguf": "GGUF"}


def is_lone_transformer(model: ModelFile, identity) -> bool:
    return identity.components == ["transformer"]


def _prefix(model: ModelFile) -> str:
    """What every key of the denoiser starts with: a lone folder's `<name>/`, the
    checkpoint root, or nothing."""
    if model.components:
        return next(iter(model.components)) + "/"
    return _ROOT if any(name.startswith(_ROOT) for name in model.infos) else ""


def _layout_match(model: ModelFile, prefix: str) -> LayoutMatch:
    matches = match_transformers(KeyView(model, prefix))
    if len(matches) != 1:  # identify refuses mixtures before this; kept for direct callers
        raise SdkitError(f"{model.path}: not one known transformer ({len(matches)} layouts match)")
    return matches[0]


def single_file_names(model: ModelFile) -> dict[str, str]:
    """Each key of a diffusers-named transformer (as the file names it) -> its single-file
    name, through the family's key map; empty where the family has none."""
    prefix = _prefix(model)
    match = _layout_match(model, prefix)
    if match.family.key_map is None:
        return {}
    names = {}
    for link in transformer_links(match.family.key_map, match.dims):
        for name in link.diffusers:
            names[prefix + name] = link.ldm[0]
    return names


class TransformerConversion(ModelConversion):
    """A lone transformer, converted to the other key convention (or re-laid in its own)."""

    def _run(self):
        self._refuse_packed()
        prefix = _prefix(self.model)
        match = _layout_match(self.model, prefix)
        self.family, self.match = match.family, match
        self.convention = "ldm" if self.options.to == "single-file" else "diffusers"
        tensors = self._plain_values(lazy_tensors(self.model))
        plan = self._plan(match, prefix, list(tensors))
        outputs = plan_tensors(plan, tensors)
        sources = {name: [name, *plan[name].sources] for name in outputs}
        self.result.convention = self.convention
        self.result.family = match.family.name
        self._write(None, None, outputs, sources)
        return self.result

    def _refuse_packed(self) -> None:
        scheme = (self.identity.precision.quantization or {}).get("scheme")
        if scheme in _PACKED_SCHEMES and not self.options.dtype:
            raise SdkitError(f"{self.model.path}: is {_PACKED_SCHEMES[scheme]}; its key layout changes with a cast "
                             "to plain values (add --dtype bf16)")

    def _plan(self, match: LayoutMatch, prefix: str, keys: list[str]) -> KeyPlan:
        if match.layout.convention == self.convention:  # the same names, without the prefix
            return {name[len(prefix):]: KeyRecipe((name,)) for name in keys if name.startswith(prefix)} | \
                {name: KeyRecipe((name,)) for name in keys if not name.startswith(prefix)}
        direction = "ldm_to_diffusers" if self.convention == "diffusers" else "diffusers_to_ldm"
        try:
            return transformer_plan(match.family, match.dims, direction, keys, prefix)
        except SdkitError as exc:
            raise SdkitError(f"{self.model.path}: {exc}") from None

    def _config(self) -> dict:
        given = self.configs.get("transformer")
        try:
            if given is not None:
                check_config(self.family, given, self.match.dims, self.match.flags)
                return dict(given)
        except SdkitError as exc:
            raise SdkitError(f"{self.options.config_dir}: {exc}") from None
        release = match_release(self.family, self.match.dims, self.match.flags,
                                self.model.metadata.get("modelspec.architecture", ""))
        try:
            return diffusers_config(self.family, self.match.dims, self.match.flags, release.release, release.exact)
        except SdkitError as exc:
            raise SdkitError(f"{self.model.path}: {exc}") from None

    def _write_output(self, view, converted, tensors: dict[str, LazyTensor]) -> None:
        if self.convention == "diffusers" and not self._writes_as_file():
            self.result.written = "folder"
            config = self._config()
            metadata = self._metadata("transformer")
            build_in_partial(self.output, self.options.force, lambda folder: write_component_folder(
                folder, "transformer", tensors, config, metadata, self.progress, self.input_hash.patch))
            return
        if not self._writes_as_file():
            raise SdkitError(f"{self.output}: the output must be a .safetensors file")
        write_file(Path(self.output), tensors, self._metadata("transformer"), self.input_hash, self.options.force,
                   self.progress)
