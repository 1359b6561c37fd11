"""Text-to-image sampling with any stack of adapters, reproducibly.

`Sampler(model, library, adapters)` draws pictures from a `LoadedModel` (see `pipeline.py`):

    library = Library(Path("~/webui").expanduser())
    adapters = resolve_adapters(AdapterArgs(loras=["detail.safetensors:0.5"]), library)
    sampler = Sampler(load_model("model.safetensors"), library, adapters)
    samples = sampler.generate(sampler.plan_prompt("a red circle <lora:style:0.8>"),
                               Settings(steps=20, cfg=7, seed=1), count=2)

Adapters come from the arguments (`--lora FILE[:w]`, `--embedding FILE[:token]`,
`--hypernet FILE[:w]`) and from A1111 prompt syntax in a library folder, both resolved
to files by `plan.py`. They are applied once per distinct set (LoRA deltas added
into the weights, hypernetworks attached to the attention), never per step. Noise is
drawn per image on the CPU from a generator seeded with `seed + i` (A1111's rule for a
batch), which also drives the ancestral samplers, so the same settings give the same
bytes on the same machine and image i of a batch is the single image of seed + i.

Every picture carries A1111's `parameters` text (`png.py`); its prompt is the
prompt without tags followed by one tag per adapter applied, at the strengths used, so
A1111 and civitai read back what was sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdkit import __version__
from sdkit.adapters.embedding import read_embedding
from sdkit.arch import FAMILIES
from sdkit.errors import SdkitError
from sdkit.ops.lora.plan import family_problem
from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.sample.conditioning import sdxl_clip_skip  # noqa: F401  (the sampler's CLIP skip rules)
from sdkit.runtime.sample.embed import PromptEmbeddings
from sdkit.runtime.sample.flow_lora import FlowLoras
from sdkit.runtime.sample.img2img import (
    Hires,
    check_denoise,
    check_hires,
    diffusers_strength,
    flow_image_to_image_pipeline,
    hires_schedule,
    hires_size,
    image_to_image_pipeline,
    img2img_steps,
    load_init_image,
    resized,
    upscale_latents,
    upscale_pixels,
    upscaler_name,
)
from sdkit.runtime.sample.library import Library
from sdkit.runtime.sample.lora import (
    AppliedLora,
    LoraRequest,
    RuntimeLoras,
    with_strength,
)
from sdkit.runtime.sample.plan import Adapters, HypernetRequest, PromptPlan, plan_prompt
from sdkit.runtime.sample.png import format_hashes, format_number, format_parameters
from sdkit.runtime.sample.prompt import hypernet_tag, lora_tag, mentions
from sdkit.runtime.sample.scheduler import (
    DEFAULT_FLOW_SAMPLER,
    DEFAULT_SAMPLER,
    SamplerChoice,
    a1111_calls_per_iteration,
    build_scheduler,
    resolve_sampler,
    schedule_steps,
)
from sdkit.runtime.sample.text_inputs import ScheduledText, own_lengths, scheduled_text

StepProgress = Callable[[int, int], None]  # (steps done, steps in this run)


@dataclass(frozen=True)
class Settings:
    """What a single pipeline run uses besides the prompt."""

    steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    width: int | None = None  # None: the model's default size
    height: int | None = None
    scheduler: str | None = None  # None: the model's default (euler-a; euler for flow models)
    schedule: str | None = None  # schedule type; None: the one in the sampler's name, else Automatic
    clip_skip: int = 1
    negative: str = ""
    lora_strength: float | None = None  # replaces every LoRA's strengths when set
    init_image: str | None = None  # img2img: the picture to start from
    denoise: float = 0.75  # img2img: A1111's denoising strength (its default)
    hires: Hires | None = None  # A1111's hires fix of a text-to-image picture


@dataclass
class Sample:
    image: Any  # PIL.Image.Image
    parameters: str
    seed: int


def check_settings(settings: Settings, count: int = 1) -> None:
    """Refuse settings no model can sample with (sizes are checked against the model)."""
    choice = resolve_sampler(settings.scheduler or DEFAULT_SAMPLER, settings.schedule)
    if settings.steps < 1:
        raise SdkitError(f"--steps must be at least 1, not {settings.steps}")
    if count < 1:
        raise SdkitError(f"--batch must be at least 1, not {count}")
    if settings.clip_skip < 1:
        raise SdkitError(f"--clip-skip must be at least 1, not {settings.clip_skip}")
    if settings.init_image is not None:
        check_denoise(settings.denoise, "--denoise")
        if img2img_steps(settings.steps, settings.denoise, choice.sampler.timestep_sampler) < 1:
            raise SdkitError(f"--denoise {settings.denoise:g} of {settings.steps} steps runs no step with "
                             f"{choice.a1111_name} (A1111 runs int(steps * denoise) of them)")
        if settings.hires is not None:
            raise SdkitError("--hires-scale applies to text-to-image pictures, not to --init-image")
    if settings.hires is not None:
        check_hires(settings.hires)


def check_clip_skip(clip_skip: int, layers: int) -> None:
    if clip_skip < 1 or clip_skip > layers:
        raise SdkitError(f"--clip-skip must be between 1 and {layers} (the text encoder's layers), "
                         f"not {clip_skip}")


def check_text_settings(pipe: Any, family: str, clip_skip: int) -> None:
    encoder = pipe.text_encoder_2 if family == "sdxl-base" else pipe.text_encoder
    check_clip_skip(clip_skip, encoder.config.num_hidden_layers)


def flow_text_arguments(pipe: Any, family: str, text: str, negative: str, clip_skip: int) -> dict[str, Any]:
    """A transformer family's prompt arguments. The long context (T5, Qwen3) is padded to
    the pipeline's length, or the tokenizer's own where shorter (a model trained on
    shorter contexts says so in its tokenizer config), and the negative prompt is always
    passed: it is the unconditional input of real CFG (see `guidance_arguments`)."""
    spec = FAMILIES[family]
    if clip_skip != 1:
        raise SdkitError(f"--clip-skip does not apply to {spec.title} (its pipeline reads its text encoders "
                         "its own way)")
    sampling = spec.sampling
    length = min(sampling.max_sequence_length, int(getattr(pipe, sampling.long_tokenizer).model_max_length))
    return {"prompt": text, "negative_prompt": negative, "max_sequence_length": length}


def guidance_arguments(pipe: Any, family: str, cfg: float) -> dict[str, Any]:
    """The CFG scale as the pipeline takes it, meaning what it means in A1111 and ComfyUI
    (1: no guidance). A FLUX.1 with a guidance embedder (dev) is given it as distilled
    guidance; one without (schnell's design) gets real CFG against the negative prompt,
    twice the model calls per step, as ComfyUI's CFG node does. Z-Image's pipeline takes
    the scale less one (`pos + g * (pos - neg)`)."""
    sampling = FAMILIES[family].sampling if family in FAMILIES else None
    guidance = sampling.guidance if sampling is not None else "cfg"
    if guidance == "cfg-1":
        return {"guidance_scale": cfg - 1.0}
    if guidance != "embedded-or-true":
        return {"guidance_scale": cfg}
    if pipe.transformer.config.guidance_embeds:
        return {"guidance_scale": cfg, "true_cfg_scale": 1.0}
    return {"true_cfg_scale": cfg}


class Sampler:
    """Samples from one loaded model, keeping its adapters applied between runs."""

    def __init__(self, model: LoadedModel, library: Library | None = None,
                 adapters: Adapters | None = None) -> None:
        self.model = model
        self.library = library
        self.adapters = adapters or Adapters()
        self.embeddings = PromptEmbeddings(model.pipe, model.text_components)
        self._loras: RuntimeLoras | FlowLoras | None = None
        self._hypernets: dict[Path, Any] = {}
        self._state: tuple[tuple[LoraRequest, ...], tuple[HypernetRequest, ...]] = ((), ())
        self._applied: list[AppliedLora] = []
        self._img2img: Any = None  # the img2img pipeline over the same modules, made when first needed
        self.notes: list[str] = []
        embeddings = self.adapters.embeddings
        if embeddings and model.is_flow:
            raise SdkitError(f"{embeddings[0][0]}: embeddings are not applied to {model.family} models yet")
        for path, token in embeddings:
            self.embeddings.add(read_embedding(path, token))

    # ---- embeddings and prompts -------------------------------------------------------

    def load_mentioned_embeddings(self, *texts: str) -> None:
        """Load the library's embeddings whose names the texts mention (A1111 loads every
        embedding of its folder, named by file stem; only the used ones matter)."""
        if self.library is None:
            return
        for name, path in self.library.names("embedding").items():
            if name.lower() not in self.embeddings.loaded and any(mentions(t, name) for t in texts):
                self.embeddings.add(read_embedding(path, name))

    def plan_prompt(self, prompt: str) -> PromptPlan:
        """The prompt's text and adapters: this sampler's own, then its tags'."""
        return plan_prompt(prompt, self.adapters, self.library)

    # ---- adapter state ----------------------------------------------------------------

    def _activate(self, loras: tuple[LoraRequest, ...], hypernets: tuple[HypernetRequest, ...]) -> None:
        if (loras, hypernets) == self._state:
            return
        if self.model.is_flow and hypernets:
            raise SdkitError(f"{hypernets[0].path}: hypernetworks are not applied to {self.model.family} models")
        if loras or self._loras is not None:
            if self._loras is None:
                self._loras = self._runtime_loras()
                self.notes += self._loras.names.notes
            self._applied = self._loras.apply(loras)
            self._note_unmapped()
        if not self.model.is_flow:
            self._attach_hypernets(hypernets)
        self._state = (loras, hypernets)

    def _runtime_loras(self) -> RuntimeLoras | FlowLoras:
        if self.model.is_flow:
            return FlowLoras(self.model.pipe, self.model.family)
        return RuntimeLoras(self.model.pipe, self.model.family, self.model.layout)

    def _note_unmapped(self) -> None:
        for report in self._applied:
            if not report.unmapped:
                continue
            name, why = next(iter(report.unmapped.items()))
            note = (f"{report.request.path}: {len(report.unmapped)} of {report.mapped + len(report.unmapped)} "
                    f"modules reach no layer of the model (e.g. {name}: {why})")
            if note not in self.notes:
                self.notes.append(note)

    def _hypernetwork(self, request: HypernetRequest) -> Any:
        from sdkit.adapters.hypernet import hypernetwork_from_model
        from sdkit.arch import identify
        from sdkit.io import open_model

        if request.path not in self._hypernets:
            with open_model(request.path) as model:
                problem = family_problem(self.model.family, identify(model).family)
                if problem:
                    raise SdkitError(f"{request.path}: {problem}")
                self._hypernets[request.path] = hypernetwork_from_model(model)
        return self._hypernets[request.path]

    def _attach_hypernets(self, requests: tuple[HypernetRequest, ...]) -> None:
        from sdkit.runtime.hypernet_attn import attach_hypernetwork, detach_hypernetwork

        unet = self.model.pipe.unet
        detach_hypernetwork(unet)
        for request in requests:
            attach_hypernetwork(unet, self._hypernetwork(request), request.strength)

    def close(self) -> None:
        """Put the model's weights and attention back as they were loaded."""
        self._activate((), ())
        if self._loras is not None:
            self._loras.close()

    # ---- sampling -----------------------------------------------------------------------

    def size(self, settings: Settings, init: Any = None) -> tuple[int, int]:
        """The picture's size: the settings', else the init image's, else the model's."""
        factor = self.model.size_multiple
        why = "the VAE's downscaling factor, times the 2x2 latent packing" if self.model.is_flow \
            else "the VAE's downscaling factor"
        sides = []
        for what, value, init_value in (("width", settings.width, init and init.width),
                                        ("height", settings.height, init and init.height)):
            side = value or init_value or self.model.default_size
            if side <= 0 or side % factor:
                where = f"--{what} {side}" if value or not init_value else f"the init image's {what} {side}"
                raise SdkitError(f"{where}: must be a positive multiple of {factor} ({why})")
            sides.append(side)
        return sides[0], sides[1]

    def sampler_choice(self, settings: Settings) -> SamplerChoice:
        name = settings.scheduler or (DEFAULT_FLOW_SAMPLER if self.model.is_flow else DEFAULT_SAMPLER)
        return resolve_sampler(name, settings.schedule, self.model.is_flow)

    def _latents(self, seeds: Sequence[int], width: int, height: int) -> tuple[torch.Tensor, list]:
        """Initial noise, one CPU generator per image; the generators go on to the sampler.
        A flow model's noise is packed into tokens as its pipeline packs its own."""
        factor = self.model.vae_scale_factor
        shape = (1, self.model.latent_channels, height // factor, width // factor)
        generators = _generators(seeds)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        if self.model.is_flow and FAMILIES[self.model.family].sampling.packed:
            noise = self.model.pipe._pack_latents(noise, len(seeds), *shape[1:])
        return noise.to(self.model.device, self.model.dtype), generators

    def _image_to_image(self) -> Any:
        if self._img2img is None and self.model.is_flow:
            class_name = FAMILIES[self.model.family].sampling.img2img_class
            if class_name is None:
                raise SdkitError(f"--init-image and --hires-scale do not apply to {self.model.family} models yet")
            self._img2img = flow_image_to_image_pipeline(self.model.pipe, class_name)
        elif self._img2img is None:
            self._img2img = image_to_image_pipeline(self.model.pipe)
        return self._img2img

    def _img2img_arguments(self, settings: Settings, denoise: float, size: tuple[int, int]) -> dict[str, Any]:
        """The img2img pass's schedule length, strength and size as its pipeline takes them:
        A1111's step count on SD/SDXL (see `img2img.py`), diffusers' own on a flow model."""
        if self.model.is_flow:
            return {"steps": settings.steps, "strength": denoise, "width": size[0], "height": size[1]}
        choice = self.sampler_choice(settings)
        steps = img2img_steps(settings.steps, denoise, choice.sampler.timestep_sampler)
        return {"steps": settings.steps, "strength": diffusers_strength(steps, settings.steps)}

    def generate(self, plan: PromptPlan, settings: Settings, count: int = 1,
                 progress: StepProgress | None = None) -> list[Sample]:
        """`count` pictures of seeds settings.seed, +1, ...; adapters applied first."""
        check_settings(settings, count)
        init = load_init_image(settings.init_image) if settings.init_image else None
        if init is not None or settings.hires is not None:
            self._image_to_image()
        width, height = self.size(settings, init)
        loras = plan.loras if settings.lora_strength is None else \
            tuple(with_strength(plan.loras, settings.lora_strength))
        self._activate(loras, plan.hypernets)
        self.load_mentioned_embeddings(plan.text, settings.negative)
        choice = self.sampler_choice(settings)
        seeds = [settings.seed + index for index in range(count)]
        with torch.inference_mode():
            run = _PipelineRun(self, choice, settings, self._prompt_texts(plan, settings), seeds, progress)
            if init is not None and settings.denoise < 1:
                images = run(self._img2img, image=resized(init, (width, height)),
                             **self._img2img_arguments(settings, settings.denoise, (width, height)))
            else:
                images = self._text_to_image(run, settings, seeds, width, height)
        return [Sample(image, self.parameters(plan, settings, seed, loras, (width, height), choice), seed)
                for image, seed in zip(images, seeds)]

    def _text_to_image(self, run: _PipelineRun, settings: Settings, seeds: list[int],
                       width: int, height: int) -> list[Any]:
        latents, generators = self._latents(seeds, width, height)
        hires = settings.hires
        upscaler = upscaler_name(hires.upscaler) if hires is not None else ""
        latent_upscale = upscaler.startswith("Latent") and not self.model.is_flow
        first = run(self.model.pipe, settings.steps, width=width, height=height, latents=latents,
                    generator=generators, output_type="latent" if latent_upscale else "pil")
        if hires is None:
            return first
        target = hires_size(width, height, hires.scale, self.model.size_multiple)
        image = upscale_latents(first, target, self.model.vae_scale_factor, upscaler) if latent_upscale \
            else [upscale_pixels(picture, target, upscaler) for picture in first]
        if self.model.is_flow:
            hires_settings = replace(settings, steps=hires.steps or settings.steps)
            return run(self._img2img, image=image, **self._img2img_arguments(hires_settings, hires.denoise, target))
        length, strength = hires_schedule(hires.steps or settings.steps, hires.denoise)
        return run(self._img2img, length, image=image, strength=strength,
                   text_steps=hires.steps or settings.steps, first_pass_steps=settings.steps)

    def _prompt_texts(self, plan: PromptPlan, settings: Settings) -> PromptTexts:
        """The prompt and negative prompt as the encoders read them (embedding names made
        placeholders), and how CLIP skip reads them (checked here, before any pass)."""
        if not self.model.is_flow:
            check_text_settings(self.model.pipe, self.model.family, settings.clip_skip)
        return PromptTexts(self.embeddings.rewrite(plan.text), self.embeddings.rewrite(settings.negative),
                           settings.clip_skip, self.embeddings.placeholder_runs())

    # ---- PNG parameters -------------------------------------------------------------

    def parameters(self, plan: PromptPlan, settings: Settings, seed: int,
                   loras: tuple[LoraRequest, ...], size: tuple[int, int] | None = None,
                   choice: SamplerChoice | None = None) -> str:
        """A1111's `parameters` text for one picture (`size`: the first pass's)."""
        width, height = size or self.size(settings)
        tags = [lora_tag(r.name, r.te_strength, r.unet_strength) for r in loras]
        tags += [hypernet_tag(r.name, r.strength) for r in plan.hypernets]
        prompt = " ".join([plan.text, *tags]).strip()
        choice = choice or self.sampler_choice(settings)
        lora_hashes = {a.request.name: a.short_hash for a in self._applied if a.short_hash}
        ti_hashes = {e.embedding.token: e.short_hash
                     for e in self.embeddings.used_in(plan.text, settings.negative) if e.short_hash}
        model = self.model
        hires = settings.hires
        denoise = hires.denoise if hires is not None else settings.denoise if settings.init_image else None
        fields = [
            ("Steps", settings.steps), ("Sampler", choice.a1111_name), ("Schedule type", choice.schedule_type),
            ("CFG scale", format_number(settings.cfg)), ("Seed", seed), ("Size", f"{width}x{height}"),
            ("Model hash", model.file_hash("model")), ("Model", model.name),
            ("VAE hash", model.file_hash("vae")), ("VAE", model.vae_path.name if model.vae_path else None),
            ("Denoising strength", format_number(denoise) if denoise is not None else None),
            ("Clip skip", settings.clip_skip if settings.clip_skip > 1 else None),
            *hires_fields(hires),
            ("Lora hashes", format_hashes(lora_hashes) if loras else None),
            ("TI hashes", format_hashes(ti_hashes)), ("Version", f"sdkit {__version__}"),
        ]
        return format_parameters(prompt, settings.negative, fields)

    def applied_loras(self) -> list[AppliedLora]:
        return list(self._applied)


def hires_fields(hires: Hires | None) -> list[tuple[str, Any]]:
    """A1111's hires fields, in the order it writes them (`Hires steps` only when set)."""
    if hires is None:
        return []
    return [("Hires upscale", format_number(hires.scale)), ("Hires steps", hires.steps or None),
            ("Hires upscaler", upscaler_name(hires.upscaler))]


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@dataclass(frozen=True)
class PromptTexts:
    """A generate call's texts, ready for the encoders."""

    prompt: str
    negative: str
    clip_skip: int
    embeddings: dict[str, dict[int, tuple[int, ...]]]


class _PipelineRun:
    """One pipeline call of a `generate`: the same prompts, guidance, seeds and progress
    for every pass, a fresh scheduler each time, and for SD/SDXL the A1111 conditioning
    of that pass, switched by the step callback as prompt editing asks."""

    def __init__(self, sampler: Sampler, choice: SamplerChoice, settings: Settings, texts: PromptTexts,
                 seeds: list[int], progress: StepProgress | None) -> None:
        self.model = sampler.model
        self.choice = choice
        self.settings = settings
        self.texts = texts
        self.seeds = seeds
        self.progress = progress
        self.switch: ScheduledText | None = None

    def _on_step(self, pipe: Any, step: int, _timestep: Any, tensors: dict) -> dict:
        if self.progress is not None:
            self.progress(step + 1, pipe.num_timesteps)
        return self.switch.after_step(pipe, step, tensors) if self.switch is not None else tensors

    def _text_arguments(self, pipe: Any, steps: int, first_pass_steps: int | None) -> dict[str, Any]:
        """The pass's text arguments; a second (hires) pass reads edits after the first's steps."""
        texts, family = self.texts, self.model.family
        if self.model.is_flow:
            self.switch = None
            return flow_text_arguments(pipe, family, texts.prompt, texts.negative, texts.clip_skip)
        first = schedule_steps(self.choice, first_pass_steps) if first_pass_steps else None
        self.switch = scheduled_text(pipe, family, texts.prompt, texts.negative, texts.clip_skip,
                                     schedule_steps(self.choice, steps), len(self.seeds), texts.embeddings, first)
        self.switch.calls_per_iteration = a1111_calls_per_iteration(self.choice, pipe.scheduler)
        return self.switch.arguments()

    def __call__(self, pipe: Any, steps: int, text_steps: int | None = None, first_pass_steps: int | None = None,
                 **arguments: Any) -> Any:
        """`steps` for the pipeline; prompt edits span `text_steps` (default: `steps`)."""
        model = self.model
        pipe.scheduler = build_scheduler(self.choice, model.scheduler_config)  # fresh state
        arguments.setdefault("generator", _generators(self.seeds))
        arguments.setdefault("output_type", "pil")
        texts = self._text_arguments(pipe, text_steps or steps, first_pass_steps)
        with own_lengths(pipe, self.switch):
            return pipe(**texts, **guidance_arguments(pipe, model.family, self.settings.cfg),
                        num_inference_steps=steps, num_images_per_prompt=len(self.seeds),
                        callback_on_step_end=self._on_step,
                        callback_on_step_end_tensor_inputs=self.switch.tensor_inputs if self.switch else [],
                        **arguments).images


def settings_with(settings: Settings, parameter: str, value: Any) -> Settings:
    """`settings` with one XY-axis parameter set (`lora_strength`, `steps`, `cfg`, ...)."""
    return replace(settings, **{parameter: value})
