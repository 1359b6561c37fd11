"""Adapter module names on a transformer denoiser (FLUX.1 / FLUX.2, Chroma, SD3.x, Z-Image,
Qwen-Image, Wan, HiDream, Lumina 2), in either key convention, alone or under a root.

The index is made from the family's key map (`sdkit.arch.families.*.KEY_MAP`, turned into
`Link`s with the sizes the layout match measured), so a layer is reached by its
single-file path (BFL / Stability names, as kohya sd-scripts and ComfyUI name LoRA
modules: `lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.double_blocks.0.…`)
and by its diffusers path (as diffusers, peft, ai-toolkit, SimpleTuner and OneTrainer do:
`transformer.transformer_blocks.0.attn.to_q`, `lora_transformer_…`), whichever
convention the base's own tensors are in. Where the two conventions cut a layer
differently, the delta is placed by rows:

- a diffusers part of a fused single-file tensor (`attn.to_q` of `img_attn.qkv`, FLUX's
  `proj_mlp` of a single block's `linear1`) is the part's rows of that tensor;
- a fused single-file module on a diffusers base (q, k and v kept apart) has its delta
  cut by rows onto each part: for a LoRA that is `up[rows] @ down`, exact; a delta that
  depends on the weight (DoRA, IA3, OFT, GLoRA) is computed on the parts' weights put
  back together first (`sdkit.ops.lora.compute`);
- a place whose two halves trade order (FLUX / SD3 `final_layer.adaLN_modulation.1` is
  (shift, scale), diffusers' `norm_out.linear` (scale, shift)) gets the delta with its
  halves exchanged when the adapter names the other convention.

ComfyUI (`comfy/lora.py` `model_lora_keys_unet`) reaches the same layers by the same
names, adding row offsets for diffusers parts of fused tensors; diffusers
(`_convert_kohya_flux_lora_to_diffusers`) instead rewrites kohya modules into per-part
modules, splitting a fused `qkv` module's up factor by rows. Families whose single files
already use diffusers' names (Qwen-Image, HiDream) have one path per layer.
"""

from __future__ import annotations

from typing import Mapping

from sdkit.adapters.lora_names import ModelNames, Piece, Target, TensorRef, index_names, underscore_names
from sdkit.arch.families.spec import Family
from sdkit.arch.fingerprint import LayoutMatch, match_transformers
from sdkit.arch.keymaps.recipe import Link
from sdkit.arch.keymaps.transformer import transformer_links
from sdkit.arch.keyview import KeyView
from sdkit.io.lazy import LazyTensor
from sdkit.io.model_file import FLOAT_DTYPES, ModelFile

COMPONENT = "unet"  # the diffusion model, whatever its design, as adapter names call it
_ENCODERS_ROOT = "text_encoders."  # a ComfyUI all-in-one checkpoint's text encoders
# kohya names text encoders by their place in SD3 in every family: te1 CLIP-L, te2 CLIP-G,
# te3 T5-XXL (sd-scripts networks/lora_flux.py: "lora_te3" for T5, "make ComfyUI compatible")
_KOHYA_COMPONENT = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
# where a denoiser's tensors may sit: ComfyUI checkpoints, a lone diffusers folder, a lone file
DENOISER_ROOTS = ("model.diffusion_model.", "transformer/", "")
_WEIGHT, _BIAS = ".weight", ".bias"


def find_denoiser(model: ModelFile) -> tuple[str, LayoutMatch] | None:
    """(root, layout match) of the one transformer denoiser in `model`, None if it holds none."""
    for root in DENOISER_ROOTS:
        view = KeyView(model, root)
        if root and not view:
            continue
        matches = match_transformers(view)
        if len(matches) == 1:
            return root, matches[0]
    return None


def transformer_names(tensors: Mapping[str, LazyTensor], root: str, match: LayoutMatch) -> ModelNames[Target]:
    """The index of the denoiser whose tensors sit under `root` in `tensors` (named in the
    convention `match.layout` describes)."""
    own = {name[len(root):]: lazy for name, lazy in tensors.items()
           if name.startswith(root) and lazy.dtype in FLOAT_DTYPES}
    builder = _Builder(own, root, match.layout.convention)
    key_map = match.family.key_map
    if key_map is not None and not key_map.same_names:
        for link in transformer_links(key_map, match.dims):
            builder.add_link(link)
    builder.add_unlinked(both_conventions=key_map is None or key_map.same_names)
    encoders = encoder_targets(tensors, match.family)
    names = index_names(builder.targets + [target for target, _alias in encoders], [])
    for target, alias in encoders:  # kohya's numbering where the family's differs
        if alias is not None:
            names.names.update({(alias, name): target for name in underscore_names(target)})
    return names


def encoder_targets(tensors: Mapping[str, LazyTensor], family: Family) -> list[tuple[Target, str | None]]:
    """The text encoders of a ComfyUI all-in-one checkpoint (`text_encoders.<name>.transformer.`,
    transformers' names inside) as targets of the family's diffusers components, each with
    the component kohya's names reach it by where that differs (FLUX.1's T5 is diffusers'
    `text_encoder_2` and kohya's `lora_te3_`)."""
    found = []
    for spec in family.text_encoders:
        if not spec.comfyui_name:
            continue
        root = f"{_ENCODERS_ROOT}{spec.comfyui_name}.transformer."
        kohya = _KOHYA_COMPONENT.get(spec.comfyui_name)
        alias = kohya if kohya not in (None, spec.component) else None
        for name, lazy in tensors.items():
            if not name.startswith(root) or not name.endswith(_WEIGHT) or not lazy.shape \
                    or lazy.dtype not in FLOAT_DTYPES:
                continue
            path = _module(name[len(root):])
            bias = _module(name) + _BIAS
            target = Target(spec.component, diffusers_path=path, ldm_path=path, weight=TensorRef(name),
                            shape=lazy.shape, dtype=lazy.dtype, ldm_key=name,
                            bias=TensorRef(bias) if bias in tensors else None)
            found.append((target, alias))
    return found


def part_rows(sizes: tuple[int | None, ...] | None, parts: int, total: int) -> list[tuple[int, int]]:
    """The rows of each part of a fused tensor of `total` rows: `sizes` per part (None
    once for the rest), or equal parts where no sizes are given."""
    if sizes is None:
        step = total // parts
        return [(i * step, (i + 1) * step) for i in range(parts)]
    rest = total - sum(size for size in sizes if size is not None)
    ranges, start = [], 0
    for size in sizes:
        stop = start + (rest if size is None else size)
        ranges.append((start, stop))
        start = stop
    return ranges


def swapped_pieces(weight: str, bias: str | None, rows: int) -> tuple[Piece, ...]:
    """A delta added with its two halves exchanged."""
    half = rows // 2
    return tuple(Piece(TensorRef(weight, base), delta, TensorRef(bias, base) if bias else None)
                 for base, delta in (((0, half), (half, rows)), ((half, rows), (0, half))))


def _module(name: str) -> str:
    return name[: -len(_WEIGHT)]


class _Builder:
    """Targets of one denoiser, from its links; names are relative to `root`."""

    def __init__(self, tensors: Mapping[str, LazyTensor], root: str, convention: str) -> None:
        self.tensors = tensors
        self.root = root
        self.convention = convention
        self.targets: list[Target] = []
        self.covered: set[str] = set()

    def _target(self, name: str, rows: tuple[int, int] | None = None, **paths) -> Target:
        """A target on the weight `name` (or its `rows`), its bias beside it."""
        lazy = self.tensors[name]
        bias = _module(name) + _BIAS
        shape = lazy.shape if rows is None else (rows[1] - rows[0], *lazy.shape[1:])
        return Target(COMPONENT, weight=TensorRef(self.root + name, rows), shape=shape, dtype=lazy.dtype,
                      bias=TensorRef(self.root + bias, rows) if bias in self.tensors else None,
                      ldm_key=self.root + name, **paths)

    def _bias_key(self, name: str) -> str | None:
        bias = _module(name) + _BIAS
        return self.root + bias if bias in self.tensors else None

    def add_link(self, link: Link) -> None:
        names = (*link.ldm, *link.diffusers)
        if link.kind == "unused" or not all(name.endswith(_WEIGHT) for name in names):
            return
        own = link.ldm if self.convention == "ldm" else link.diffusers
        if not all(name in self.tensors for name in own):
            return  # a place this model lacks (SD3 Medium's q/k norms, a second attention)
        self.covered.update(own)
        ldm, parts = _module(link.ldm[0]), [_module(name) for name in link.diffusers]
        if link.kind == "same":
            self.targets.append(self._target(own[0], ldm_path=ldm, diffusers_path=parts[0]))
        elif link.kind == "swap":
            self._add_swapped(own[0], ldm, parts[0])
        elif link.kind == "fused" and self.convention == "ldm":
            self._add_parts_of_fused(own[0], ldm, parts, link.arg)
        elif link.kind == "fused":
            self._add_fused_over_parts(own, ldm, parts)

    def _add_swapped(self, name: str, ldm: str, diffusers: str) -> None:
        mine, other = ({"ldm_path": ldm}, {"diffusers_path": diffusers}) if self.convention == "ldm" \
            else ({"diffusers_path": diffusers}, {"ldm_path": ldm})
        self.targets.append(self._target(name, **mine))
        crossed = self._target(name, **other)
        crossed.pieces = swapped_pieces(self.root + name, self._bias_key(name), crossed.shape[0])
        self.targets.append(crossed)

    def _add_parts_of_fused(self, name: str, ldm: str, parts: list[str],
                            sizes: tuple[int | None, ...] | None) -> None:
        """A single-file base: the fused tensor whole, and each diffusers part its rows."""
        self.targets.append(self._target(name, ldm_path=ldm))
        for part, rows in zip(parts, part_rows(sizes, len(parts), self.tensors[name].shape[0])):
            self.targets.append(self._target(name, rows, diffusers_path=part))

    def _add_fused_over_parts(self, names: tuple[str, ...], ldm: str, parts: list[str]) -> None:
        """A diffusers base: each part whole, and the single-file module cut over them."""
        pieces, start = [], 0
        for name, part in zip(names, parts):
            self.targets.append(self._target(name, diffusers_path=part))
            stop = start + self.tensors[name].shape[0]
            bias = self._bias_key(name)
            pieces.append(Piece(TensorRef(self.root + name), (start, stop), TensorRef(bias) if bias else None))
            start = stop
        first = self.tensors[names[0]]
        self.targets.append(Target(COMPONENT, ldm_path=ldm, weight=TensorRef(self.root + names[0]),
                                   shape=(start, *first.shape[1:]), dtype=first.dtype,
                                   ldm_key=self.root + names[0], pieces=tuple(pieces)))

    def add_unlinked(self, both_conventions: bool) -> None:
        """Weights no link names keep their own path (in both conventions where the
        family's single files use diffusers' names)."""
        for name, lazy in self.tensors.items():
            if not name.endswith(_WEIGHT) or name in self.covered or not lazy.shape:
                continue
            path = _module(name)
            paths = {"ldm_path": path, "diffusers_path": path} if both_conventions else \
                {"ldm_path" if self.convention == "ldm" else "diffusers_path": path}
            self.targets.append(self._target(name, **paths))
