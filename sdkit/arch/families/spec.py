"""The shapes of what sdkit knows about a model family, as plain data.

A family module fills these in; nothing here names a family. Sizes in a `DenoiserLayout`
are written as templates so one description serves the released model and a tiny test
model alike: an int is a fixed size, a name (`"hidden"`) binds to whatever the file has
and must agree everywhere it appears, `"3*hidden"` is a multiple of a bound name,
`"hidden+2*kv"` a sum of such terms (a query and two narrower key/value projections
stacked), and None accepts any size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Dim = int | str | None


def size_terms(size: str) -> tuple[tuple[int, str], ...]:
    """The terms of a size template as (factor, name) pairs, name "" for a constant:
    `"hidden+2*kv"` is ((1, "hidden"), (2, "kv")), `"3*hidden"` is ((3, "hidden"),)."""
    terms = []
    for term in size.split("+"):
        factor, _, name = term.strip().rpartition("*")
        if not factor and name.isdigit():
            terms.append((int(name), ""))
        else:
            terms.append((int(factor or 1), name))
    return tuple(terms)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, named as the diffusers component holding it."""

    component: str  # "text_encoder" … "text_encoder_4"
    # "clip" (HF CLIP layout) | "openclip" | "t5" | "umt5" | "chatglm", or the design of a
    # decoder-only language model: "qwen3" | "qwen2.5-vl" | "gemma2" | "llama" (Llama, Mistral)
    architecture: str
    width: int
    part: str = ""  # the released encoder people name: "CLIP-L", "CLIP-G", "T5-XXL", …
    # what tells decoder language models of one design and width apart (None: not checked)
    layers: int | None = None
    vocab: int | None = None
    heads: tuple[int, int, int] | None = None  # query heads, key/value heads, head width
    # models sdkit has no family for that run with this encoder too ("FLUX.2 [dev]")
    used_outside: tuple[str, ...] = ()
    # its name under `text_encoders.` in a ComfyUI all-in-one checkpoint ("clip_l", "t5xxl");
    # empty where sdkit does not know it
    comfyui_name: str = ""
    # the denoiser dimension this encoder's width equals ("pooled", "context"), so the encoder
    # of a model of any size is told by its measured width; None: the released width
    feeds: str | None = None


@dataclass(frozen=True)
class LatentFormat:
    """The VAE latent space: `latent = (encoded - shift) * scale` (diffusers' VAE config
    `scaling_factor` / `shift_factor`; ComfyUI `latent_formats.py`)."""

    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics (Playground v2.5)
    latents_std: tuple[float, ...] | None = None
    video: bool = False  # the latent of a 3-D (causal video) VAE, with a time axis
    # FLUX.2: latents are patchified 2x2 and normalized by the VAE's own BatchNorm running
    # statistics (`bn.running_mean` / `bn.running_var`), not by a scale and shift
    batch_norm: bool = False


@dataclass(frozen=True)
class DenoiserLayout:
    """How one key convention names a transformer denoiser, relative to its root.

    - `markers`: key prefixes, any of which says "this layout is meant" (the file is then
      either this denoiser or an unknown relative of it, never another family);
    - `shapes`: keys that must all exist, each with its shape template;
    - `optional_shapes`: keys checked only when present (a guidance embedder);
    - `counts`: named block counts, each a regex whose one group is the block index;
    - `flags`: named booleans, true when a key starts with the given prefix.
    """

    convention: str  # "ldm" (the original single-file names) | "diffusers"
    markers: tuple[str, ...]
    shapes: Mapping[str, tuple[Dim, ...]]
    optional_shapes: Mapping[str, tuple[Dim, ...]] = field(default_factory=dict)
    counts: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Place:
    """One tensor place of a transformer in the single-file and the diffusers names.

    kinds:
    - "same": one tensor each side, equal (`img_in` ⇄ `x_embedder`);
    - "fused": one single-file tensor holds several diffusers tensors stacked along dim 0
      (`img_attn.qkv` ⇄ `attn.to_q`, `attn.to_k`, `attn.to_v`); `sizes` gives each part's
      rows as layout dims (`"hidden"`, `"3*hidden"`, an int; None once for "the rest"),
      or is empty for equal parts;
    - "swap": the two halves along dim 0 trade places (the original final-layer
      modulation is (shift, scale), diffusers' is (scale, shift));
    - "unused": a single-file tensor the diffusers model has no place for (Lumina 2's
      `norm_final`, built but never applied): left out going to diffusers and made again
      going back, `fill` in every element, shaped by `sizes`, in the dtype of the one
      diffusers tensor named (`diffusers`), so a converted file stays complete.

    Names are modules and get each of `params` appended (`.weight`, `.bias`; a parameter
    absent from a file is skipped); with `params=()` they are whole tensor names.
    """

    ldm: str
    diffusers: tuple[str, ...]
    kind: str = "same"
    sizes: tuple[Dim, ...] = ()
    params: tuple[str, ...] = ("weight", "bias")
    fill: float = 0.0


def same(ldm: str, diffusers: str, params: tuple[str, ...] = ("weight", "bias")) -> Place:
    return Place(ldm, (diffusers,), params=params)


def tensor(ldm: str, diffusers: str) -> Place:
    """One tensor renamed whole (`norm.query_norm.scale` ⇄ `norm_q.weight`)."""
    return Place(ldm, (diffusers,), params=())


def kept(*names: str, params: tuple[str, ...] = ("weight", "bias")) -> tuple[Place, ...]:
    """Places named alike in both conventions (`t_embedder.mlp.0` in Z-Image)."""
    return tuple(Place(name, (name,), params=params) for name in names)


def fused(ldm: str, *parts: str, sizes: tuple[Dim, ...] = (), params: tuple[str, ...] = ("weight", "bias")) -> Place:
    return Place(ldm, parts, "fused", sizes, params)


def swapped(ldm: str, diffusers: str) -> Place:
    return Place(ldm, (diffusers,), "swap")


def unused(ldm: str, like: str, sizes: tuple[Dim, ...], fill: float, params: tuple[str, ...] = ("weight",)) -> Place:
    """A single-file tensor diffusers drops; made again as `fill` in the dtype of `like`."""
    return Place(ldm, (like,), "unused", sizes, params, fill)


@dataclass(frozen=True)
class BlockMap:
    """The places of every block of one numbered list (`double_blocks.{i}.` ⇄
    `transformer_blocks.{i}.`); `count` is the `DenoiserLayout.counts` name giving the
    number of blocks, and `last` replaces places of the final block where it differs."""

    count: str
    ldm: str
    diffusers: str
    places: tuple[Place, ...]
    last: tuple[Place, ...] = ()


@dataclass(frozen=True)
class KeyMap:
    """A transformer's single-file ⇄ diffusers key map, as data: the places outside the
    numbered blocks and the block lists. Sizes come from the file (the layout match), so
    one map serves every release and a tiny model alike. `same_names`: the single files
    already use diffusers' names (HiDream, Qwen-Image), so every key keeps its name."""

    places: tuple[Place, ...]
    blocks: tuple[BlockMap, ...] = ()
    same_names: bool = False


# the map of a family whose single files and diffusers models name every tensor alike
SAME_NAMES = KeyMap(places=(), same_names=True)


@dataclass(frozen=True)
class DiffusersModel:
    """The diffusers class of a family's transformer and how its config follows from a file.

    `config` is the released model's config.json (its first release); `measured` says
    which config values the weights show, as what the layout match measured: a dim or
    count name (`"double_blocks"`), a quotient by a name or a number (`"hidden/head"`;
    `"in_channels/4"`: the channels of the released 2 x 2 patches) or a flag
    (`"flag:guidance"`). `unmeasured` lists the values the weights cannot show that still
    depend on the sizes (rotary axes must add up to the head width): a model with other
    sizes than a release's needs its own config for them.
    """

    class_name: str
    config: Mapping[str, Any]
    measured: Mapping[str, str]
    unmeasured: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingPipeline:
    """How the family's diffusers pipeline draws a picture, for `sdkit sample`.

    `text_encoders` maps each encoder component to its transformers class (its tokenizer
    is the component of the same number, `tokenizer_N`); `schedule` is the released
    `scheduler/scheduler_config.json` (`FlowMatchEulerDiscreteScheduler`), and
    `undistilled_schedule` the one of a release without a guidance embedder where it
    differs (FLUX.1-schnell). `guidance` is how the pipeline takes a CFG scale:
    "cfg" (`guidance_scale`, real CFG against the negative prompt), "cfg-1"
    (`guidance_scale` is the scale minus one: `pos + g * (pos - neg)`, so 0 is none) or
    "embedded-or-true" (FLUX.1: a guidance embedder takes it as distilled guidance, a model
    without one gets `true_cfg_scale`). `packed`: the pipeline takes its noise packed into
    2 x 2 tokens (`_pack_latents`). `max_sequence_length`: the pipeline's default, bounded
    by `long_tokenizer`'s own length. `unprojected_pools`: CLIP encoders whose pooled
    output the model takes as it is although the pipeline's class projects it; their
    diffusers folder holds an identity `text_projection` (SD3's CLIP-L, as diffusers'
    single-file loader sets it). `img2img_class`: the family's diffusers img2img pipeline,
    built over the same components (None: `--init-image` and hires fix are refused).
    """

    class_name: str
    text_encoders: Mapping[str, str]
    schedule: Mapping[str, Any]
    guidance: str = "cfg"
    packed: bool = False
    max_sequence_length: int = 512
    long_tokenizer: str = "tokenizer"
    vae_class: str = "AutoencoderKL"
    undistilled_schedule: Mapping[str, Any] | None = None
    unprojected_pools: tuple[str, ...] = ()
    img2img_class: str | None = None


@dataclass(frozen=True)
class Release:
    """One released model of a family, as its weights show it.

    `dims` and `flags` are what a layout measures (bound names, block counts, flags);
    `ratios` relate two measured sizes (`{"in_channels": ("out_channels", 6)}`: six times),
    which holds for a tiny model of the same design too. Releases that share every key
    and shape with another (FLUX.1 Kontext and Krea have dev's) list in `named_by` the
    words of a `modelspec.architecture` that name them; the weights alone never do.
    """

    name: str
    dims: Mapping[str, int] = field(default_factory=dict)
    flags: Mapping[str, bool] = field(default_factory=dict)
    ratios: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    variant: str = "normal"  # Identity.variant: normal | inpaint | pix2pix | depth
    named_by: tuple[str, ...] = ()
    # the text encoders of this release where they differ from the family's (FLUX.2 Klein:
    # Qwen3, where FLUX.2-dev has Mistral)
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    modelspec_architecture: str | None = None
    civitai_base_models: tuple[str, ...] = ()
    air_ecosystem: str | None = None  # Civitai ecosystem key, lowercased as AIRs write it
    # where a release runs with other parts than its family's (Wan 2.2 TI2V-5B: its own VAE)
    latent: LatentFormat | None = None
    vae_part: str | None = None
    image_encoder: str | None = None  # the image encoder it conditions on (Wan 2.1 I2V: CLIP-H)
    config: Mapping[str, Any] = field(default_factory=dict)  # its diffusers config where it differs


@dataclass(frozen=True)
class Lineage:
    """A line of fine-tunes with its family's exact weights design (Pony, Illustrious on
    SDXL): only names tell it, so it is read from the words of the file's title or name."""

    name: str
    words: tuple[str, ...]  # lowercase words of a title or file name that name it
    civitai_base_model: str = ""


@dataclass(frozen=True)
class Family:
    """What sdkit knows about a released model family.

    Dimensions (`context_dim`, `unet_channels`, `adm_channels`, …) are the released
    model's; `identify()` compares a file's measured ones with them. Transformer families
    also carry the `layouts` their denoiser is stored in and their `releases`.
    """

    name: str
    title: str
    denoiser: str  # "unet" | "mmdit" | "flux"
    context_dim: int  # cross-attention / text-context width seen by the denoiser
    unet_channels: int  # UNet model_channels, or the transformer hidden size
    adm_channels: int | None  # pooled-vector input (SDXL label_emb, SD3 y, Flux vector_in)
    unet_levels: int | None  # UNet resolution levels; None for transformers
    in_channels: int  # denoiser input channels of the plain (non-inpaint) model
    latent: LatentFormat
    default_resolution: int
    modelspec_architecture: str | None
    kohya_base_model_version: str | None
    text_encoders: tuple[TextEncoderSpec, ...]
    vae_part: str  # what people call the VAE this family needs; "" for a pixel-space model
    # "epsilon" | "v-or-epsilon" (SD2: releases of both) | "flow" (flow matching) | "edm"
    prediction: str = "epsilon"
    other_unet_channels: tuple[int, ...] = ()  # further released sizes (SD3.5 large)
    # sd-scripts' `ss_network_module` for a LoRA of this family's denoiser
    kohya_network_module: str = "networks.lora"
    derived_from: str | None = None  # same denoiser design as this family (Kolors: SDXL)
    embedding_width: int | None = None  # textual-inversion vector width that names it
    modelspec_prefixes: tuple[str, ...] = ()  # `modelspec.architecture` starts that name it
    # the architecture written for a variant ("inpaint", "depth") or for "v-prediction"
    modelspec_variants: Mapping[str, str] = field(default_factory=dict)
    v_prediction_resolution: int | None = None  # SD 2.x 768-v
    kohya_v_suffix: bool = False  # sd-scripts appends "_v" for v-prediction
    kohya_version_pattern: str | None = None  # regex on lowercased `ss_base_model_version`
    gguf_architecture: str | None = None  # `general.architecture` ComfyUI-GGUF writes for it
    # regex on a diffusers `model_index.json` `_class_name` of the family's pipelines
    diffusers_pipeline_pattern: str | None = None
    civitai_base_models: tuple[str, ...] = ()  # Civitai `baseModel` values of the family
    air_ecosystem: str | None = None
    layouts: tuple[DenoiserLayout, ...] = ()
    releases: tuple[Release, ...] = ()
    key_map: KeyMap | None = None  # single-file ⇄ diffusers names of the transformer
    diffusers_model: DiffusersModel | None = None  # the transformer's diffusers class and config
    sampling: SamplingPipeline | None = None  # how `sdkit sample` draws it (transformer families)
    # denoiser modules an fp8 cast leaves in their precision (regexes matched at the start
    # of a key below the denoiser root, in single-file names): embedders, final layers and
    # whatever else the released fp8 files of the family keep
    fp8_keep: tuple[str, ...] = ()
    # the codebase whose key names the family's single files use (ModelSpec
    # `modelspec.implementation`, as sd-scripts' `sai_model_spec` writes it); None: diffusers'
    implementation: str | None = None
    # lines of fine-tunes of this design, most specific first (NoobAI before Illustrious,
    # which it descends from)
    lineages: tuple[Lineage, ...] = ()
    # where the VAE sits in the family's all-in-one checkpoints (ComfyUI's `vae_key_prefix`:
    # `vae.` for the newer families; SD3 as Stability released it keeps the LDM root)
    checkpoint_vae_root: str = "vae."

    def accepts_unet_channels(self, channels: int) -> bool:
        return channels == self.unet_channels or channels in self.other_unet_channels

    # the latent format under the names the rest of sdkit used before it was grouped
    @property
    def latent_channels(self) -> int:
        return self.latent.channels

    @property
    def vae_scaling_factor(self) -> float:
        return self.latent.scaling_factor

    @property
    def vae_shift_factor(self) -> float:
        return self.latent.shift_factor

    @property
    def latents_mean(self) -> tuple[float, ...] | None:
        return self.latent.latents_mean

    @property
    def latents_std(self) -> tuple[float, ...] | None:
        return self.latent.latents_std

    def release(self, name: str) -> Release | None:
        return next((r for r in self.releases if r.name == name), None)

    def latents(self) -> list[tuple[LatentFormat, str]]:
        """Every latent format of the family's releases, with the VAE that makes it."""
        found = [(self.latent, self.vae_part)]
        found += [(r.latent, r.vae_part or self.vae_part) for r in self.releases if r.latent]
        return list(dict.fromkeys(found))

    def vae_part_for(self, channels: int) -> str:
        """The VAE of this family whose latent has this many channels."""
        return next((part for latent, part in self.latents() if latent.channels == channels),
                    self.vae_part)
