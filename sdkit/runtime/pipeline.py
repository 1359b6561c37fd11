"""Any Stable Diffusion model file as a diffusers pipeline, offline.

`load_model(path)` accepts an LDM single-file checkpoint (A1111 / ComfyUI layout) or a
diffusers folder of the SD 1.x, SD 2.x or SDXL base family, and (for sampling) a diffusers
folder or diffusion model with its parts of a transformer family whose `Family.sampling`
says how diffusers draws it: FLUX.1, SD3 / 3.5, Chroma, Z-Image, Qwen-Image, Lumina 2
(`flow_load.py`). The SD files go
through one path:
the model is seen in the diffusers convention (`sdkit.ops.layout`, whose key maps
derive every component's config from the weights), each component is built from its
config with empty weights and the (converted) tensors are assigned to it. Nothing is
downloaded and diffusers' `from_single_file` is never called.

What weights cannot tell comes from, in order: `config` (a local diffusers folder of
the same architecture), the model's own folder, and family defaults (a model whose
sizes are not the released ones and cannot be built with them asks for `config`):
- tokenizers: `config/tokenizer[_2]`, the model folder's, a companion folder
  `<file>.tokenizer/` beside a single file (the tokenizer files themselves, or
  `tokenizer/` and `tokenizer_2/` in it), the local Hugging Face cache of the family's
  reference repositories (`local_files_only`), then the CLIP tokenizer sdkit ships
  (`sdkit.data.pipeline_defaults`) when the text encoder has CLIP's vocabulary; else a
  one-line error naming `--config`;
- the scheduler config: `config/scheduler`, the folder's, else the SD training schedule
  (betas 0.00085 -> 0.012 scaled_linear over 1000 steps, "leading" spacing, offset 1)
  with the model's prediction type and zero-terminal-SNR rescaling;
- inferred text-encoder configs take their special-token ids from the tokenizer.

So a single file of a released size loads with no network and no `--config`.

Precision (`dtype="auto"`): float16 on CUDA, float32 on CPU. The SDXL VAE overflows in
float16; diffusers' SDXL pipeline decodes in float32 when the VAE config says
`force_upcast` (the AutoencoderKL default, and what SDXL's own config says), so `auto`
keeps float16 for the UNet there too. Attention is torch SDPA (diffusers' default).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdkit.arch import FAMILIES, Identity, identify
from sdkit.data.pipeline_defaults import (
    sampling_schedule,
    shipped_tokenizer,
    tokenizer_refusal,
)
from sdkit.errors import SdkitError, with_article
from sdkit.io import LazyTensor, hash_file, open_model
from sdkit.io.diffusers_folder import read_json
from sdkit.ops.layout import (
    LAYOUT_OF_FAMILY,
    convert_view,
    extract_component,
    model_view,
)

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl-base")
# rectified-flow transformer families (those with `Family.sampling`); sampling only
FLOW_FAMILIES = tuple(name for name, spec in FAMILIES.items() if spec.sampling is not None)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# reference repositories whose tokenizers a local Hugging Face cache may hold
_CACHED_TOKENIZERS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "sd1": (("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer"), ("openai/clip-vit-large-patch14", None)),
    "sd2": (("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer")),
    "sdxl-base": (("stabilityai/stable-diffusion-xl-base-1.0", "{sub}"),),
}


@dataclass
class LoadedModel:
    """A model ready to sample: the diffusers pipeline and what describes it."""

    pipe: Any  # StableDiffusionPipeline | StableDiffusionXLPipeline | a transformer family's pipeline
    path: Path
    identity: Identity
    layout: str  # a key of sdkit.arch.keymaps.LAYOUTS; the family's name for flow models
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    vae_path: Path | None = None
    _hashes: dict[str, Future] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> str:
        return self.identity.family

    @property
    def name(self) -> str:
        """What A1111 writes as `Model:`: the file name without its suffix."""
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def vae_scale_factor(self) -> int:
        if self.is_flow:  # the pipeline's own (Lumina 2 fixes it at 8, Qwen-Image counts its VAE's levels)
            return int(self.pipe.vae_scale_factor)
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """What width and height must be multiples of: transformers patch 2x2 latents into a token."""
        return self.vae_scale_factor * (2 if self.is_flow else 1)

    @property
    def latent_channels(self) -> int:
        if self.is_flow:  # a packed transformer reads 2x2 latents a token
            packed = FAMILIES[self.family].sampling.packed
            return int(self.pipe.transformer.config.in_channels) // (4 if packed else 1)
        return int(self.pipe.unet.config.in_channels)

    @property
    def default_size(self) -> int:
        """diffusers' default side: the UNet's sample size in pixels; for a transformer, the VAE's
        (1024 for the released one), the transformer having no size of its own."""
        if self.is_flow:
            return int(getattr(self.pipe.vae.config, "sample_size", None) or FAMILIES[self.family].default_resolution)
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def text_components(self) -> list[str]:
        return [c for c in ("text_encoder", "text_encoder_2") if getattr(self.pipe, c, None) is not None]

    def file_hash(self, which: str) -> str | None:
        """AutoV2 (sha256, first 10 hex) of the model ("model") or the VAE ("vae") file."""
        future = self._hashes.get(which)
        return future.result() if future is not None else None


# ---- choices ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise SdkitError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SdkitError("--device cuda: no CUDA device is available to torch")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SdkitError(f"dtype must be one of auto, {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


# ---- configs, tokenizers, scheduler ----------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise SdkitError(f"{path}: expected a JSON object")
    return value


def read_config_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """The component configs of a local diffusers folder (`--config`)."""
    if not folder.is_dir():
        raise SdkitError(f"{folder}: --config must be a local diffusers folder")
    configs = {}
    for component in (*_MODEL_COMPONENTS, "text_encoder_3", "transformer", "scheduler"):
        for name in ("config.json", "scheduler_config.json"):
            if (folder / component / name).is_file():
                configs[component] = _read_json(folder / component / name)
    if (folder / "model_index.json").is_file():
        configs["model_index"] = _read_json(folder / "model_index.json")
    if not configs:
        raise SdkitError(f"{folder}: no component config.json found (expected a diffusers folder)")
    return configs


def _tokenizer_folders(model_path: Path, config_dir: Path | None, sub: str) -> list[Path]:
    folders = []
    if config_dir is not None:
        folders.append(config_dir / sub)
    if model_path.is_dir():
        folders.append(model_path / sub)
    else:
        companion = model_path.with_name(model_path.name + ".tokenizer")
        folders += [companion / sub, companion]
    return [folder for folder in folders if (folder / "vocab.json").is_file() or
            (folder / "tokenizer.json").is_file()]


def _from_cache(family: str, sub: str) -> Any | None:
    """The tokenizer of a reference repository in the local Hugging Face cache, if there.

    The files are looked up first: asked for files it lacks, transformers 5 gives back an
    empty tokenizer instead of failing."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import CLIPTokenizer

    for repo, subfolder in _CACHED_TOKENIZERS.get(family, ()):
        filename = f"{subfolder.format(sub=sub)}/vocab.json" if subfolder else "vocab.json"
        vocab = try_to_load_from_cache(repo, filename)
        if isinstance(vocab, str):
            return CLIPTokenizer.from_pretrained(Path(vocab).parent, local_files_only=True)
    return None


def find_tokenizer(model_path: Path, config_dir: Path | None, family: str, sub: str,
                   encoder_config: Mapping[str, Any]) -> Any:
    """The CLIP tokenizer `sub` ("tokenizer" | "tokenizer_2") of a model, found offline."""
    from transformers import CLIPTokenizer

    for folder in _tokenizer_folders(model_path, config_dir, sub):
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    found = _from_cache(family, sub) or shipped_tokenizer(LAYOUT_OF_FAMILY[family], sub, encoder_config)
    if found is None:
        raise SdkitError(f"{model_path}: no {sub} found offline and {tokenizer_refusal(encoder_config)}; "
                         f"pass --config DIR (a local diffusers folder of this model) or put its tokenizer "
                         f"in {model_path.name}.tokenizer/")
    return found


def default_scheduler_config(identity: Identity) -> dict[str, Any]:
    return sampling_schedule(identity.prediction, "zero_terminal_snr" in identity.facts)


# ---- building modules ------------------------------------------------------------------

def _component_tensors(tensors: Mapping[str, LazyTensor], component: str) -> dict[str, LazyTensor]:
    head = component + "/"
    return {name[len(head):]: lazy for name, lazy in tensors.items() if name.startswith(head)}


def _assign(module: torch.nn.Module, tensors: Mapping[str, LazyTensor], dtype: torch.dtype,
            what: str) -> torch.nn.Module:
    """Load every tensor into the (empty) module, cast once to `dtype`."""
    own = module.state_dict()
    loaded = {}
    for key, lazy in tensors.items():
        if key not in own:
            continue  # e.g. position ids that this transformers version keeps unsaved
        tensor = lazy.load()
        loaded[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = [key for key in own if key not in loaded and own[key].device.type == "meta"]
    if missing:
        raise SdkitError(f"{what}: {len(missing)} weights missing from the model, e.g. {missing[0]}")
    module.load_state_dict(loaded, strict=False, assign=True)
    return module.eval().requires_grad_(False)


def _text_keys(tensors: dict[str, LazyTensor], projection: bool) -> dict[str, LazyTensor]:
    """transformers 5 names CLIPTextModel weights without `text_model.`, the projection
    variant with it; files come either way."""
    renamed = {}
    for key, lazy in tensors.items():
        bare = key.removeprefix("text_model.")
        renamed[bare if not projection or bare == "text_projection.weight" else "text_model." + bare] = lazy
    return renamed


def _build_text_encoder(config: dict[str, Any], tensors: dict[str, LazyTensor], dtype: torch.dtype,
                        what: str) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdkit.arch.keymaps import has_projection

    projection = has_projection(config, tensors)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with init_empty_weights():
        module = cls(CLIPTextConfig.from_dict(config))
    return _assign(module, _text_keys(tensors, projection), dtype, what)


def _build_diffusers_model(cls: type, config: dict[str, Any], tensors: dict[str, LazyTensor],
                           dtype: torch.dtype, what: str) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = cls.from_config(config)
    return _assign(module, tensors, dtype, what)


def _with_token_ids(config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """An inferred text-encoder config with the tokenizer's special-token ids (the
    pooled output is read at the end-of-text token)."""
    return {**config, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# ---- loading ---------------------------------------------------------------------------

def _check_base(path: Path, identity: Identity, flow: bool, has_parts: bool) -> None:
    families = SUPPORTED_FAMILIES + (FLOW_FAMILIES if flow else ())
    if flow and identity.family in FLOW_FAMILIES and has_parts and identity.components == ["transformer"]:
        return  # a transformer diffusion model alone, its text encoders and VAE given as files
    if identity.kind != "checkpoint":
        raise SdkitError(f"{path}: is {with_article(identity.part or identity.kind)}, not a whole model to sample from")
    if identity.family not in families:
        raise SdkitError(f"{path}: family {identity.family} cannot be sampled "
                         f"(supported: {', '.join(families)})")
    if identity.variant != "normal":
        raise SdkitError(f"{path}: {with_article(identity.variant)} model needs an input image; sample draws from text")


def _own_configs(model: Any, given: dict[str, dict]) -> dict[str, dict]:
    """Scheduler and pipeline configs: --config's, else the model folder's."""
    folder_configs = dict(model.extra.get("configs") or {}) if model.components else {}
    found = {}
    if "scheduler" in given or "scheduler" in folder_configs:
        found["scheduler"] = given.get("scheduler") or folder_configs["scheduler"]
    index = given.get("model_index") or model.extra.get("model_index")
    if isinstance(index, dict):
        found["model_index"] = index
    return found


def _hash_in_background(path: Path) -> Future:
    """AutoV2 of `path`, computed by a daemon thread (an interrupted run does not wait
    for a multi-gigabyte hash to finish)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(hash_file(path).autov2)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the hash
            future.set_exception(exc)

    threading.Thread(target=run, name="sdkit-hash", daemon=True).start()
    return future


def load_model(path: str | os.PathLike[str], *, config: str | os.PathLike[str] | None = None,
               vae: str | os.PathLike[str] | None = None, device: str = "auto",
               dtype: str = "auto", require_vae: bool = True, flow: bool = False,
               text_encoders: Sequence[str | os.PathLike[str]] = ()) -> LoadedModel:
    """Load a checkpoint file or diffusers folder (and optionally another VAE) for sampling.

    The file hashes the PNG parameters name (AutoV2) are computed in a background
    thread while the weights load. `require_vae=False` accepts a model that carries no
    VAE (for tools that only run its UNet and text encoders): its `pipe.vae` is None.
    `flow=True` also accepts the transformer families of `FLOW_FAMILIES` (for sampling; the
    trainer and validators run UNets and FLUX.1): a diffusers folder, or the diffusion model
    alone with `vae` and `text_encoders` files.
    """
    path = Path(path)
    config_dir = Path(config) if config is not None else None
    given = read_config_folder(config_dir) if config_dir is not None else {}
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with open_model(path) as model:
        identity = identify(model)
        _check_base(path, identity, flow, has_parts=vae is not None or bool(text_encoders))
        hashes = {"model": _hash_in_background(path)} if path.is_file() else {}
        if identity.family in FLOW_FAMILIES:
            return _load_flow(path, model, identity, config_dir, given, (torch_device, torch_dtype), hashes,
                              vae, text_encoders)
        view = model_view(model, identity)
        converted = convert_view(view, "diffusers", {c: given[c] for c in _MODEL_COMPONENTS if c in given})
        extras = _own_configs(model, given)
        # in the order they are built, so the message names the part that failed first
        derived = [c for c in _MODEL_COMPONENTS if c in converted.configs and c not in given] \
            if view.convention == "ldm" else []
        try:
            modules = _build_components(path, config_dir, identity, converted.tensors, converted.configs,
                                        given, torch_dtype, require_vae)
        except ValueError as exc:  # diffusers / torch refuse a module the derived config describes
            raise _needs_config(path, view.layout, converted.configs, derived) or exc from None
    vae_path = Path(vae) if vae is not None else None
    if vae_path is not None:
        if "vae" not in modules:
            raise SdkitError(f"{path}: has no VAE for {vae_path} to replace")
        modules["vae"] = _load_vae(vae_path, converted.configs["vae"], torch_dtype)
        if vae_path.is_file():
            hashes["vae"] = _hash_in_background(vae_path)
    scheduler_config = extras.get("scheduler") or default_scheduler_config(identity)
    pipe = _assemble(identity.family, modules, scheduler_config, extras.get("model_index") or {})
    pipe.to(torch_device)
    return LoadedModel(pipe, path, identity, LAYOUT_OF_FAMILY[identity.family], dict(scheduler_config),
                       torch_device, torch_dtype, vae_path, hashes)


def _load_flow(path: Path, model: Any, identity: Identity, config_dir: Path | None, given: dict[str, dict],
               placement: tuple[torch.device, torch.dtype], hashes: dict[str, Future],
               vae: str | os.PathLike[str] | None, text_encoders: Sequence[str | os.PathLike[str]]) -> LoadedModel:
    from sdkit.runtime.flow_load import (
        assemble_flow,
        build_flow_modules,
        text_encoder_components,
    )

    device, dtype = placement
    family = FAMILIES[identity.family]
    parts = text_encoder_components(family, [Path(file) for file in text_encoders])
    vae_path = Path(vae) if vae is not None else None
    if vae_path is not None:
        parts["vae"] = vae_path
        if vae_path.is_file():
            hashes["vae"] = _hash_in_background(vae_path)
    modules, scheduler_config = build_flow_modules(family, path, model, config_dir, given, dtype, parts)
    pipe = assemble_flow(family, modules, scheduler_config)
    pipe.to(device)
    return LoadedModel(pipe, path, identity, family.name, dict(scheduler_config), device, dtype, vae_path, hashes)


def _needs_config(path: Path, layout: str, configs: Mapping[str, dict], derived: list[str]) -> SdkitError | None:
    """Why configs read off a single file's weights cannot build its model: a size that is
    not the released model's, so settings such as the norm groups are guesses."""
    from sdkit.arch.keymaps.stock import needs_config_message

    why = needs_config_message(layout, configs, derived)
    return SdkitError(f"{path}: {why}") if why else None


def _build_components(path: Path, config_dir: Path | None, identity: Identity,
                      tensors: Mapping[str, LazyTensor], configs: Mapping[str, dict],
                      given: Mapping[str, dict], dtype: torch.dtype, require_vae: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    text = "text_encoder" if identity.family != "sdxl-base" else "text_encoder_2"
    for needed in ("unet", "vae", text) if require_vae else ("unet", text):
        if needed not in configs:
            raise SdkitError(f"{path}: has no {needed}; sample needs a whole model")
    modules: dict[str, Any] = {
        "unet": _build_diffusers_model(UNet2DConditionModel, configs["unet"],
                                       _component_tensors(tensors, "unet"), dtype, f"{path}: unet"),
    }
    # --config's VAE config alone is no VAE: its weights must be in the model
    if require_vae or "vae" in identity.components:
        modules["vae"] = _build_diffusers_model(AutoencoderKL, configs["vae"], _component_tensors(tensors, "vae"),
                                                dtype, f"{path}: vae")
    folder_configs = path.is_dir()
    for component in ("text_encoder", "text_encoder_2"):
        if component not in configs:
            continue
        config = configs[component]
        tokenizer = find_tokenizer(path, config_dir, identity.family, _TOKENIZER_OF[component], config)
        if component not in given and not folder_configs:
            config = _with_token_ids(config, tokenizer)
        encoder = _build_text_encoder(config, _component_tensors(tensors, component), dtype,
                                      f"{path}: {component}")
        # a bare vocab.json + merges.txt says no length; pipelines pad to it
        tokenizer.model_max_length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        modules[component], modules[_TOKENIZER_OF[component]] = encoder, tokenizer
    return modules


def _load_vae(path: Path, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """Another VAE (a file in either convention, a diffusers folder, or a checkpoint that
    holds one), built with the model's VAE config so it must fit it exactly."""
    from diffusers import AutoencoderKL

    with open_model(path) as model:
        identity = identify(model)
        if identity.kind not in ("vae", "checkpoint"):
            raise SdkitError(f"{path}: is {with_article(identity.part or identity.kind)}, not a VAE")
        try:
            tensors = extract_component(model, "vae", "diffusers", identity=identity, configs={"vae": config})
            return _build_diffusers_model(AutoencoderKL, config, tensors, dtype, "vae")
        except SdkitError as exc:
            raise SdkitError(f"{path}: not a VAE for this model ({exc})") from None


def _assemble(family: str, modules: dict[str, Any], scheduler_config: dict[str, Any],
              model_index: Mapping[str, Any]) -> Any:
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    if family == "sdxl-base":
        force_zeros = model_index.get("force_zeros_for_empty_prompt", True)
        pipe = StableDiffusionXLPipeline(
            vae=modules.get("vae"), text_encoder=modules.get("text_encoder"),
            text_encoder_2=modules["text_encoder_2"], tokenizer=modules.get("tokenizer"),
            tokenizer_2=modules["tokenizer_2"], unet=modules["unet"], scheduler=scheduler,
            force_zeros_for_empty_prompt=bool(force_zeros))
    else:
        pipe = StableDiffusionPipeline(
            vae=modules.get("vae"), text_encoder=modules["text_encoder"], tokenizer=modules["tokenizer"],
            unet=modules["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
