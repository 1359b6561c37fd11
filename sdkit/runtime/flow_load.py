"""A transformer family's model as its diffusers pipeline, offline: a diffusers folder, or
the split parts ComfyUI users keep (the diffusion model alone, in single-file or diffusers
names, with the text encoders and the VAE given as files).

The family says what to build (`Family.sampling`: the pipeline class, each text encoder's
transformers class, the VAE class, the released schedule) and how its single files name
the transformer (`Family.key_map`). As for the SD families (`pipeline.py`), each component
is built from its config with empty weights and the tensors are assigned to it; nothing is
downloaded. Configs and tokenizers come from `config` (a local diffusers folder of the
same model), else the model's own folder. Without a scheduler config, the family's
released one (for FLUX.1, dev's or schnell's as the weights show a guidance embedder).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from sdkit.arch.families.spec import Family, SamplingPipeline
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, ModelFile, lazy_tensors, open_model


def default_schedule(family: Family, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    sampling = family.sampling
    undistilled = sampling.undistilled_schedule
    if undistilled is not None and not transformer_config.get("guidance_embeds"):
        return dict(undistilled)
    return dict(sampling.schedule)


def _component_tensors(tensors: Mapping[str, LazyTensor], component: str) -> dict[str, LazyTensor]:
    head = component + "/"
    return {name[len(head):]: lazy for name, lazy in tensors.items() if name.startswith(head)}


def _build_t5(config: dict[str, Any], tensors: dict[str, LazyTensor], dtype: torch.dtype, what: str) -> Any:
    """T5EncoderModel; files keep its input table once, as `shared.weight` (the encoder's
    `embed_tokens` is the same table, tied again after loading)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    from sdkit.runtime.pipeline import _assign

    with init_empty_weights():
        module = T5EncoderModel(T5Config.from_dict(config))
    tensors = dict(tensors)
    table, twin_table = "shared.weight", "encoder.embed_tokens.weight"
    for name, twin in ((twin_table, table), (table, twin_table)):
        if name not in tensors and twin in tensors:
            tensors[name] = tensors[twin]
    module = _assign(module, tensors, dtype, what)
    module.encoder.embed_tokens = module.shared
    return module


def _build_language_model(class_name: str, config: dict[str, Any], tensors: dict[str, LazyTensor],
                          dtype: torch.dtype, what: str) -> Any:
    """A decoder language model whose hidden states are the text context (Qwen3 for
    Z-Image, Qwen2.5-VL for Qwen-Image, Gemma 2 for Lumina 2). Files name its weights
    the ways transformers itself reads: the class's own names, the older layout its
    loading renames (Qwen2.5-VL's `visual.` and `model.layers.`, as save_pretrained still
    writes them), or with the `model.` of the causal-LM class (ComfyUI's
    `qwen_3_4b.safetensors`, where a diffusers folder keeps a `Qwen3Model`)."""
    import transformers
    from accelerate import init_empty_weights

    from sdkit.runtime.pipeline import _assign

    cls = getattr(transformers, class_name)
    with init_empty_weights():
        module = cls(cls.config_class.from_dict(config))
    own = module.state_dict()
    renamings = _weight_renamings(module)
    renamed = {}
    for name, lazy in tensors.items():
        key = name
        for renaming in renamings if key not in own else ():
            key = renaming.rename_source_key(key)[0]
        bare = name.removeprefix("model.")
        renamed[key if key in own or bare not in own else bare] = lazy
    return _assign(module, renamed, dtype, what)


def _weight_renamings(module: Any) -> list[Any]:
    """The key renamings transformers applies when it loads `module` (none where this
    transformers has no such table)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    return [step for step in get_model_conversion_mapping(module) if isinstance(step, WeightRenaming)]


def _tokenizers(path: Path, config_dir: Path | None, sampling: SamplingPipeline, title: str) -> dict[str, Any]:
    from transformers import AutoTokenizer, CLIPTokenizer

    found = {}
    for component, class_name in sampling.text_encoders.items():
        name = component.replace("text_encoder", "tokenizer")
        cls = CLIPTokenizer if class_name.startswith("CLIP") else AutoTokenizer
        folders = [folder / name for folder in (config_dir, path if path.is_dir() else None) if folder is not None]
        folder = next((f for f in folders if (f / "tokenizer_config.json").is_file() or (f / "vocab.json").is_file()),
                      None)
        if folder is None:
            raise SdkitError(f"{path}: no {name} found offline; pass --config DIR (a local diffusers folder "
                             f"of this {title} model)")
        found[name] = cls.from_pretrained(folder, local_files_only=True)
    return found


def _folder_configs(model: ModelFile, given: Mapping[str, dict]) -> dict[str, dict]:
    configs = dict(model.extra.get("configs") or {}) if model.components else {}
    return {**configs, **given}


def build_flow_modules(family: Family, path: Path, model: ModelFile, config_dir: Path | None,
                       given: Mapping[str, dict], dtype: torch.dtype,
                       parts: Mapping[str, Path] | None = None) -> tuple[dict[str, Any], dict]:
    """The pipeline components of a `family` folder (or a lone diffusion model with `parts`:
    "vae" and text-encoder component names mapped to files), and its scheduler config."""
    with ExitStack() as files:  # the parts stay open while their tensors are read
        return _build_flow_modules(family, path, model, (config_dir, given), dtype, dict(parts or {}), files)


def _build_flow_modules(family: Family, path: Path, model: ModelFile, config: tuple[Path | None, Mapping[str, dict]],
                        dtype: torch.dtype, parts: dict[str, Path], files: ExitStack) -> tuple[dict[str, Any], dict]:
    config_dir, given = config
    sampling = family.sampling
    configs = _folder_configs(model, given)
    if model.components:
        tensors = lazy_tensors(model)
    elif "transformer" not in configs:
        raise SdkitError(f"{path}: {with_article(family.title)} single file samples with --config DIR (a local "
                         "diffusers folder of this model: its configs and tokenizers)")
    else:  # a diffusion model alone, or with its text encoders and VAE in one file (all-in-one)
        tensors = all_in_one_tensors(family, model, configs)
    components = ("transformer", *sampling.text_encoders, "vae")
    missing = [c for c in components if c not in configs or not (_component_tensors(tensors, c) or c in parts)]
    if missing:
        raise SdkitError(f"{path}: has no {missing[0]}; {with_article(family.title)} model samples with "
                         f"{needed_parts(family)} (a diffusers folder, or the diffusion model with "
                         "--text-encoder and --vae files)")
    modules = {}
    for component in components:
        if component in parts:
            source = _part_tensors(files.enter_context(open_model(parts[component])), component, configs)
        else:
            source = _component_tensors(tensors, component)
        modules[component] = _build_component(sampling, family, component, configs, source, dtype,
                                              f"{parts.get(component, path)}: {component}")
    modules.update(_tokenizers(path, config_dir, sampling, family.title))
    schedule = configs.get("scheduler") or default_schedule(family, configs["transformer"])
    return modules, schedule


def needed_parts(family: Family) -> str:
    """What a diffusion model of the family is given with: "CLIP-L, CLIP-G, T5-XXL and the SD3 VAE"."""
    names = [spec.part for spec in family.text_encoders]
    return f"{', '.join(names)} and the {family.vae_part}"


def _build_component(sampling: SamplingPipeline, family: Family, component: str, configs: Mapping[str, dict],
                     tensors: dict[str, LazyTensor], dtype: torch.dtype, what: str) -> Any:
    import diffusers

    from sdkit.runtime.pipeline import _build_diffusers_model, _build_text_encoder

    if component == "transformer":
        cls = getattr(diffusers, family.diffusers_model.class_name)
        return _build_diffusers_model(cls, configs[component], tensors, dtype, what)
    if component == "vae":
        return _build_diffusers_model(getattr(diffusers, sampling.vae_class), configs[component], tensors, dtype, what)
    class_name = sampling.text_encoders[component]
    if class_name.startswith("CLIP"):
        return _build_text_encoder(configs[component], tensors, dtype, what)
    if class_name == "T5EncoderModel":
        return _build_t5(configs[component], tensors, dtype, what)
    return _build_language_model(class_name, configs[component], tensors, dtype, what)


def encoder_component(family: Family, encoder: Mapping[str, Any]) -> str:
    """The family's component for an encoder a checkpoint keeps under ComfyUI's name
    (`text_encoders.t5xxl.` is FLUX.1's `text_encoder_2`, SD3's `text_encoder_3`)."""
    words = encoder["prefix"].split(".")
    named = words[1] if words[0] == "text_encoders" and len(words) > 2 else None
    return next((spec.component for spec in family.text_encoders if named and spec.comfyui_name == named),
                encoder["component"])


def all_in_one_tensors(family: Family, model: ModelFile, configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
    """A single file's components in diffusers names, as `component/name`: the transformer,
    and the text encoders and VAE an all-in-one checkpoint keeps beside it
    (`text_encoders.clip_l.transformer.`, `first_stage_model.`)."""
    from sdkit.arch import identify
    from sdkit.ops.parts.split import VAE_ROOTS
    from sdkit.ops.vae.swap import renamed_model

    identity = identify(model)
    found = {f"transformer/{k}": v for k, v in _transformer_in_diffusers_names(model, identity, configs).items()}
    tensors = lazy_tensors(model)
    for encoder in identity.facts.get("text_encoders") or []:
        head, component = encoder["prefix"], encoder_component(family, encoder)
        found.update({f"{component}/{name[len(head):]}": lazy for name, lazy in tensors.items()
                      if head and name.startswith(head)})
    root = next((root for root in VAE_ROOTS if any(name.startswith(root) for name in tensors)), None)
    if root is not None and "vae" in configs:  # seen as a VAE file of its own
        vae = renamed_model(model, {name[len(root):]: name for name in tensors if name.startswith(root)})
        found.update({f"vae/{name}": lazy for name, lazy in _part_tensors(vae, "vae", configs).items()})
    return found


def _transformer_in_diffusers_names(model: ModelFile, identity: Any,
                                    configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
    """A lone diffusion model's tensors in diffusers names (single files converted through
    the family's key map, lazily); scaled fp8 and mixed-precision weights as the values
    they stand for (ComfyUI's fp8 files)."""
    from sdkit.arch.fingerprint import match_transformers
    from sdkit.arch.keymaps.transformer import check_config, transformer_plan
    from sdkit.arch.keyview import KeyView
    from sdkit.ops.convert.dequantize import plain_values
    from sdkit.ops.layout import plan_tensors

    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in model.infos) else ""
    (match,) = match_transformers(KeyView(model, prefix))
    if "transformer" in configs:
        check_config(match.family, configs["transformer"], match.dims, match.flags)
    tensors = plain_values(model, identity, lazy_tensors(model))
    if match.layout.convention == "diffusers":
        return {name[len(prefix):]: lazy for name, lazy in tensors.items() if name.startswith(prefix)}
    plan = transformer_plan(match.family, match.dims, "ldm_to_diffusers", [k for k in tensors if k.startswith(prefix)],
                            prefix)
    return plan_tensors(plan, tensors)


def _part_tensors(part: ModelFile, component: str, configs: Mapping[str, dict]) -> dict[str, LazyTensor]:
    """A text encoder or VAE given as its own file, in diffusers / transformers names; a
    scaled fp8 text encoder (ComfyUI's t5xxl_fp8_e4m3fn_scaled) as the values it stands for."""
    from sdkit.arch import identify
    from sdkit.ops.convert.dequantize import plain_values
    from sdkit.ops.layout import extract_component

    identity = identify(part)
    if component == "vae":
        return extract_component(part, "vae", "diffusers", identity=identity, configs={"vae": configs["vae"]})
    return plain_values(part, identity, dict(lazy_tensors(part)))


def text_encoder_components(family: Family, paths: list[Path]) -> dict[str, Path]:
    """Which of the family's text encoders each file holds: by design (CLIP, T5, Qwen3, …)
    and width; encoders a file fits equally (tiny CLIP-L and CLIP-G) in the order given."""
    from sdkit.arch import identify

    free = list(family.sampling.text_encoders)
    specs = {spec.component: spec for spec in family.text_encoders}
    found = {}
    for path in paths:
        with open_model(path) as part:
            facts = (identify(part).facts.get("text_encoders") or [{}])[0]
        fitting = [c for c in free if _same_design(specs[c].architecture, facts.get("architecture"))]
        if not fitting:
            raise SdkitError(f"{path}: is not a text encoder of {family.title} (it needs {needed_parts(family)})")
        exact = [c for c in fitting if specs[c].width == facts.get("width")]
        component = (exact or fitting)[0]
        free.remove(component)
        found[component] = path
    return found


def _same_design(wanted: str, seen: str | None) -> bool:
    """CLIP-G is an OpenCLIP model that files keep in HF CLIP names as often as not."""
    clips = ("clip", "openclip")
    return seen == wanted or (wanted in clips and seen in clips)


def assemble_flow(family: Family, modules: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, family.sampling.class_name)
    pipe = cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)), **modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe
