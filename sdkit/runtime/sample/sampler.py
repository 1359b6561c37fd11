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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sdkit import __version__
from sdkit.adapters.embedding import read_embedding
from sdkit.errors import SdkitError
from sdkit.ops.lora.plan import family_problem
from sdkit.runtime.pipeline import LoadedModel
from sdkit.runtime.sample.embed import PromptEmbeddings
from sdkit.runtime.sample.flow_lora import FlowLoras
from sdkit.runtime.sample.library import Library
from sdkit.runtime.sample.lora import AppliedLora, LoraRequest, RuntimeLoras, with_strength
from sdkit.runtime.sample.plan import Adapters, HypernetRequest, PromptPlan, plan_prompt
from sdkit.runtime.sample.png import format_hashes, format_number, format_parameters
from sdkit.runtime.sample.prompt import hypernet_tag, lora_tag, mentions
from sdkit.runtime.sample.scheduler import (DEFAULT_FLOW_SAMPLER, DEFAULT_SAMPLER, FLOW_SAMPLERS, make_scheduler,
                                            sampler_spec)

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
    clip_skip: int = 1
    negative: str = ""
    lora_strength: float | None = None  # replaces every LoRA's strengths when set


@dataclass
class Sample:
    image: Any  # PIL.Image.Image
    parameters: str
    seed: int


def check_settings(settings: Settings, count: int = 1) -> None:
    """Refuse settings no model can sample with (sizes are checked against the model)."""
    if settings.scheduler is not None and settings.scheduler not in FLOW_SAMPLERS:
        sampler_spec(settings.scheduler)
    if settings.steps < 1:
        raise SdkitError(f"--steps must be at least 1, not {settings.steps}")
    if count < 1:
        raise SdkitError(f"--batch must be at least 1, not {count}")
    if settings.clip_skip < 1:
        raise SdkitError(f"--clip-skip must be at least 1, not {settings.clip_skip}")


def check_clip_skip(clip_skip: int, layers: int) -> None:
    if clip_skip < 1 or clip_skip > layers:
        raise SdkitError(f"--clip-skip must be between 1 and {layers} (the text encoder's layers), "
                         f"not {clip_skip}")


def sdxl_clip_skip(clip_skip: int) -> int | None:
    """A1111's CLIP skip as diffusers' SDXL `clip_skip`: SDXL always reads the penultimate
    layer (A1111's default there), so 1 and 2 both mean that; larger values go further back."""
    return clip_skip - 2 if clip_skip > 2 else None


def encode_skipped(pipe: Any, text: str, clip_skip: int) -> torch.Tensor:
    """SD1/SD2 text embeddings with A1111's CLIP skip: the hidden state `clip_skip` layers
    from the end, through the final layer norm (diffusers' own clip_skip path reaches for
    a `text_model` level that transformers 5 no longer has)."""
    encoder = pipe.text_encoder
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(encoder.device)
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def text_arguments(pipe: Any, family: str, text: str, negative: str, clip_skip: int) -> dict[str, Any]:
    """The prompt arguments of a pipeline call for this CLIP skip.

    An empty negative prompt is passed as no negative prompt: SDXL pipelines then use
    zeroed conditioning for the unconditional pass (`force_zeros_for_empty_prompt`, as
    A1111 does for an empty SDXL negative), which is what SDXL models are trained to see
    there; encoding "" instead gives a different, off-distribution unconditional pass.
    SD1/SD2 pipelines encode "" for a missing negative prompt, so nothing changes there."""
    if family == "flux":
        return flux_text_arguments(pipe, text, negative, clip_skip)
    encoder = pipe.text_encoder_2 if family == "sdxl-base" else pipe.text_encoder
    check_clip_skip(clip_skip, encoder.config.num_hidden_layers)
    if family == "sdxl-base":
        return {"prompt": text, "negative_prompt": negative or None, "clip_skip": sdxl_clip_skip(clip_skip)}
    if clip_skip == 1:
        return {"prompt": text, "negative_prompt": negative or None}
    return {"prompt_embeds": encode_skipped(pipe, text, clip_skip),
            "negative_prompt_embeds": encode_skipped(pipe, negative, clip_skip)}


def flux_text_arguments(pipe: Any, text: str, negative: str, clip_skip: int) -> dict[str, Any]:
    """FLUX.1's prompt arguments. T5's context is padded to the tokenizer's own length (512
    for the released tokenizer, what FluxPipeline pads to; a model trained on shorter
    contexts says so in its tokenizer config), and the negative prompt is always passed:
    it is the unconditional input of real CFG (see `guidance_arguments`)."""
    if clip_skip != 1:
        raise SdkitError("--clip-skip does not apply to FLUX.1 (it reads CLIP's pooled output)")
    length = min(512, int(pipe.tokenizer_2.model_max_length))
    return {"prompt": text, "negative_prompt": negative, "max_sequence_length": length}


def guidance_arguments(pipe: Any, family: str, cfg: float) -> dict[str, Any]:
    """The CFG scale as the pipeline takes it. A FLUX.1 with a guidance embedder (dev) is
    given it as distilled guidance; one without (schnell's design) gets real CFG against
    the negative prompt, twice the model calls per step, as ComfyUI's CFG node does."""
    if family != "flux":
        return {"guidance_scale": cfg}
    if pipe.transformer.config.guidance_embeds:
        return {"guidance_scale": cfg, "true_cfg_scale": 1.0}
    return {"true_cfg_scale": cfg}


class Sampler:
    """Samples from one loaded model, keeping its adapters applied between runs."""

    def __init__(self, model: LoadedModel, library: Library | None = None,
                 adapters: Adapters = Adapters()) -> None:
        self.model = model
        self.library = library
        self.adapters = adapters
        self.embeddings = PromptEmbeddings(model.pipe, model.text_components)
        self._loras: RuntimeLoras | FlowLoras | None = None
        self._hypernets: dict[Path, Any] = {}
        self._state: tuple[tuple[LoraRequest, ...], tuple[HypernetRequest, ...]] = ((), ())
        self._applied: list[AppliedLora] = []
        self.notes: list[str] = []
        if adapters.embeddings and model.is_flow:
            raise SdkitError(f"{adapters.embeddings[0][0]}: embeddings are not applied to {model.family} models yet")
        for path, token in adapters.embeddings:
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

    def size(self, settings: Settings) -> tuple[int, int]:
        width = settings.width or self.model.default_size
        height = settings.height or self.model.default_size
        factor = self.model.size_multiple
        why = "the VAE's downscaling factor, times the 2x2 latent packing" if self.model.is_flow \
            else "the VAE's downscaling factor"
        for what, value in (("width", width), ("height", height)):
            if value <= 0 or value % factor:
                raise SdkitError(f"--{what} {value}: must be a positive multiple of {factor} ({why})")
        return width, height

    def scheduler_name(self, settings: Settings) -> str:
        if settings.scheduler is not None:
            return settings.scheduler
        return DEFAULT_FLOW_SAMPLER if self.model.is_flow else DEFAULT_SAMPLER

    def _latents(self, seeds: Sequence[int], width: int, height: int) -> tuple[torch.Tensor, list]:
        """Initial noise, one CPU generator per image; the generators go on to the sampler.
        A flow model's noise is packed into tokens as its pipeline packs its own."""
        factor = self.model.vae_scale_factor
        shape = (1, self.model.latent_channels, height // factor, width // factor)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        if self.model.is_flow:
            noise = self.model.pipe._pack_latents(noise, len(seeds), *shape[1:])
        return noise.to(self.model.device, self.model.dtype), generators

    def generate(self, plan: PromptPlan, settings: Settings, count: int = 1,
                 progress: StepProgress | None = None) -> list[Sample]:
        """`count` pictures of seeds settings.seed, +1, ...; adapters applied first."""
        check_settings(settings, count)
        width, height = self.size(settings)
        loras = plan.loras if settings.lora_strength is None else \
            tuple(with_strength(plan.loras, settings.lora_strength))
        self._activate(loras, plan.hypernets)
        self.load_mentioned_embeddings(plan.text, settings.negative)
        pipe = self.model.pipe
        name = self.scheduler_name(settings)
        pipe.scheduler = make_scheduler(name, self.model.scheduler_config, self.model.is_flow)  # fresh state
        seeds = [settings.seed + index for index in range(count)]
        latents, generators = self._latents(seeds, width, height)

        def on_step(_pipe: Any, step: int, _timestep: Any, tensors: dict) -> dict:
            if progress is not None:
                progress(step + 1, len(_pipe.scheduler.timesteps))
            return tensors

        with torch.inference_mode():
            texts = text_arguments(pipe, self.model.family, self.embeddings.rewrite(plan.text),
                                   self.embeddings.rewrite(settings.negative), settings.clip_skip)
            images = pipe(**texts, **guidance_arguments(pipe, self.model.family, settings.cfg),
                          num_inference_steps=settings.steps, width=width, height=height,
                          num_images_per_prompt=count, latents=latents, generator=generators, output_type="pil",
                          callback_on_step_end=on_step).images
        return [Sample(image, self.parameters(plan, settings, seed, loras), seed)
                for image, seed in zip(images, seeds)]

    # ---- PNG parameters -------------------------------------------------------------

    def parameters(self, plan: PromptPlan, settings: Settings, seed: int,
                   loras: tuple[LoraRequest, ...]) -> str:
        """A1111's `parameters` text for one picture."""
        width, height = self.size(settings)
        tags = [lora_tag(r.name, r.te_strength, r.unet_strength) for r in loras]
        tags += [hypernet_tag(r.name, r.strength) for r in plan.hypernets]
        prompt = " ".join([plan.text, *tags]).strip()
        spec = sampler_spec(self.scheduler_name(settings), self.model.is_flow)
        lora_hashes = {a.request.name: a.short_hash for a in self._applied if a.short_hash}
        ti_hashes = {e.embedding.token: e.short_hash
                     for e in self.embeddings.used_in(plan.text, settings.negative) if e.short_hash}
        model = self.model
        fields = [
            ("Steps", settings.steps), ("Sampler", spec.a1111_name), ("Schedule type", spec.schedule_type),
            ("CFG scale", format_number(settings.cfg)), ("Seed", seed), ("Size", f"{width}x{height}"),
            ("Model hash", model.file_hash("model")), ("Model", model.name),
            ("VAE hash", model.file_hash("vae")), ("VAE", model.vae_path.name if model.vae_path else None),
            ("Clip skip", settings.clip_skip if settings.clip_skip > 1 else None),
            ("Lora hashes", format_hashes(lora_hashes) if loras else None),
            ("TI hashes", format_hashes(ti_hashes)), ("Version", f"sdkit {__version__}"),
        ]
        return format_parameters(prompt, settings.negative, fields)

    def applied_loras(self) -> list[AppliedLora]:
        return list(self._applied)


def settings_with(settings: Settings, parameter: str, value: Any) -> Settings:
    """`settings` with one XY-axis parameter set (`lora_strength`, `steps`, `cfg`, ...)."""
    return replace(settings, **{parameter: value})
