"""What a PNG says it was drawn with, as `sdkit sample` options (`--from-png`).

Two kinds of PNG are read:
- A1111 / Forge / sdkit: the `parameters` text (`png.py`; fields as A1111's
  `modules/infotext_utils.py::parse_generation_parameters` reads them). "Denoising
  strength" is the hires pass's when a "Hires upscale" field is there, else an img2img
  strength (which needs the init image, not stored in the PNG);
- ComfyUI: the `prompt` text, the API graph `{node id: {class_type, inputs}}` where an
  input is a value or a link `[node id, output]`. The first KSampler /
  KSamplerAdvanced (lowest node id) gives seed, steps, cfg, sampler and scheduler; its
  `positive` / `negative` links lead (through conditioning nodes) to CLIPTextEncode
  texts, its `latent_image` to EmptyLatentImage's size, its `model` through LoraLoader
  nodes (written into the prompt as A1111 tags) to CheckpointLoaderSimple, and the CLIP
  chain to CLIPSetLastLayer (CLIP skip). A second sampler fed by LatentUpscaleBy of the
  first one's output is a hires pass.

Only the options a PNG states are set; the command line overrides any of them. The model
a PNG names is not looked for: `model_note` says when the one drawn with differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sdkit.errors import SdkitError
from sdkit.runtime.sample import png
from sdkit.runtime.sample.prompt import lora_tag

COMFY_KEY = "prompt"
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
# ComfyUI's LatentUpscale methods as A1111's latent upscaler names
_COMFY_UPSCALE = {"nearest-exact": "Latent (nearest-exact)", "bilinear": "Latent", "bicubic": "Latent (bicubic)",
                  "area": "Latent (antialiased)", "bislerp": "Latent"}


@dataclass
class Replay:
    """Sample options read from a PNG, by `sdkit sample` option name; absent ones are
    not stated by the PNG."""

    source: str  # "A1111" | "ComfyUI"
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # the model the PNG names (checkpoint name or A1111 `Model`)
    model_hash: str | None = None  # A1111's `Model hash` (AutoV2: sha256, first 10 hex)
    notes: list[str] = field(default_factory=list)


def read_replay(path: str | os.PathLike[str]) -> Replay:
    """The generation settings stored in an A1111 or ComfyUI PNG."""
    texts = png.png_texts(path)
    if isinstance(texts.get(png.PARAMETERS_KEY), str) and texts[png.PARAMETERS_KEY].strip():
        return replay_a1111(texts[png.PARAMETERS_KEY])
    if isinstance(texts.get(COMFY_KEY), str):
        try:
            graph = json.loads(texts[COMFY_KEY])
        except ValueError:
            raise SdkitError(f"{path}: its ComfyUI '{COMFY_KEY}' text is not JSON") from None
        return replay_comfy(graph, str(path))
    raise SdkitError(f"{path}: the PNG holds neither A1111 '{png.PARAMETERS_KEY}' nor ComfyUI '{COMFY_KEY}' text")


# ---- A1111 ---------------------------------------------------------------------------

def replay_a1111(text: str) -> Replay:
    fields = png.parse_parameters(text)
    summary = png.generation_summary(fields)
    options = {"prompts": (summary["prompt"],), "negative": summary["negative_prompt"],
               "steps": summary["steps"], "cfg": summary["cfg_scale"], "seed": summary["seed"],
               "width": summary["width"], "height": summary["height"], "scheduler": summary["sampler"],
               "schedule": summary["schedule_type"], "clip_skip": summary["clip_skip"]}
    replay = Replay("A1111", model=summary["model"], model_hash=summary["model_hash"])
    denoise = summary["denoising_strength"]
    if "Hires resize" in fields and summary["hires_upscale"] is None:
        raise SdkitError(f"Hires resize {fields['Hires resize']}: a hires target size is not replayed; "
                         "give --hires-scale")
    if summary["hires_upscale"] is not None:
        options.update(hires_scale=summary["hires_upscale"], hires_steps=summary["hires_steps"],
                       hires_denoise=denoise, hires_upscaler=fields.get("Hires upscaler"))
    elif denoise is not None:
        options["denoise"] = denoise
        replay.notes.append(f"drawn from an init image at Denoising strength {denoise:g}; "
                            "give --init-image to draw it again")
    replay.options = {key: value for key, value in options.items() if value is not None}
    return replay


# ---- ComfyUI --------------------------------------------------------------------------

class _Graph:
    """A ComfyUI API graph and the links between its nodes."""

    def __init__(self, graph: Any, where: str) -> None:
        if not isinstance(graph, dict):
            raise SdkitError(f"{where}: its ComfyUI '{COMFY_KEY}' text is not a node graph")
        self.nodes = {str(key): node for key, node in graph.items()
                      if isinstance(node, dict) and isinstance(node.get("inputs"), dict)}
        self.where = where

    def ordered(self, classes: tuple[str, ...]) -> list[str]:
        found = [key for key, node in self.nodes.items() if node.get("class_type") in classes]
        return sorted(found, key=lambda key: (len(key), key))  # "3" before "10", as ComfyUI numbers them

    def linked(self, value: Any) -> str | None:
        """The node id a link `[id, output]` points to; None for a plain value."""
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in self.nodes:
            return str(value[0])
        return None

    def inputs(self, key: str) -> dict[str, Any]:
        return self.nodes[key]["inputs"]

    def kind(self, key: str) -> str:
        return str(self.nodes[key].get("class_type"))

    def follow(self, value: Any, names: tuple[str, ...], stop: tuple[str, ...]) -> str | None:
        """From a link, the first node of a class in `stop`, passing through nodes by
        their first input named in `names`."""
        key = self.linked(value)
        for _ in range(64):  # a graph is acyclic; the bound keeps a broken one from looping
            if key is None or self.kind(key) in stop:
                return key
            inputs = self.inputs(key)
            key = next((self.linked(inputs[name]) for name in names if self.linked(inputs.get(name))), None)
        return None

    def text(self, value: Any) -> str:
        """A prompt: the text of the CLIPTextEncode a conditioning link comes from."""
        key = self.follow(value, ("conditioning", "conditioning_to", "conditioning_1"),
                          ("CLIPTextEncode", "CLIPTextEncodeSDXL"))
        if key is None:
            raise SdkitError(f"{self.where}: a sampler's conditioning does not come from a CLIPTextEncode node")
        inputs = self.inputs(key)
        text = inputs.get("text", inputs.get("text_g", ""))
        source = self.linked(text)
        if source is not None:  # a text node: its first string input
            text = next((v for v in self.inputs(source).values() if isinstance(v, str)), "")
        return str(text)


def replay_comfy(graph: Any, where: str = "ComfyUI graph") -> Replay:
    nodes = _Graph(graph, where)
    samplers = nodes.ordered(_SAMPLER_NODES)
    if not samplers:
        raise SdkitError(f"{where}: the ComfyUI graph has no KSampler node")
    first = nodes.inputs(samplers[0])
    replay = Replay("ComfyUI")
    options: dict[str, Any] = {
        "prompts": (nodes.text(first.get("positive")) + _lora_tags(nodes, first.get("model")),),
        "negative": nodes.text(first.get("negative")), "steps": first.get("steps"), "cfg": first.get("cfg"),
        "seed": first.get("seed", first.get("noise_seed")), "scheduler": first.get("sampler_name"),
        "schedule": _comfy_schedule(first.get("scheduler"), where),
    }
    options.update(_latent_size(nodes, first, replay))
    options.update(_clip_skip(nodes, first.get("positive")))
    checkpoint = nodes.follow(first.get("model"), ("model",), ("CheckpointLoaderSimple", "CheckpointLoader"))
    if checkpoint is not None:
        replay.model = PurePosixPath(str(nodes.inputs(checkpoint).get("ckpt_name", ""))).stem or None
    options.update(_hires_pass(nodes, samplers))
    replay.options = {key: value for key, value in options.items() if value is not None}
    return replay


def _comfy_schedule(name: Any, where: str) -> str | None:
    if name == "beta":  # ComfyUI's beta picks model sigmas; diffusers' (and A1111's) spaces sigma itself
        raise SdkitError(f"{where}: ComfyUI's beta scheduler (model sigmas at beta-distributed steps) "
                         "has no diffusers equivalent (give --schedule to draw with another)")
    return str(name) if name is not None else None


def _latent_size(nodes: _Graph, sampler: dict[str, Any], replay: Replay) -> dict[str, Any]:
    key = nodes.linked(sampler.get("latent_image"))
    denoise = sampler.get("denoise", 1.0)
    if key is not None and nodes.kind(key) in _LATENT_NODES:
        inputs = nodes.inputs(key)
        return {"width": inputs.get("width"), "height": inputs.get("height")}
    steps = sampler.get("steps")
    if isinstance(denoise, (int, float)) and 0 < denoise < 1 and isinstance(steps, int):
        replay.notes.append(f"drawn from an init image at denoise {denoise:g}; give --init-image to draw it again")
        # ComfyUI runs its steps as the last of a steps/denoise schedule; A1111 counts a strength of
        # that schedule (about as many steps, give or take one)
        return {"denoise": float(denoise), "steps": int(steps / denoise)}
    return {}


def _clip_skip(nodes: _Graph, positive: Any) -> dict[str, Any]:
    encoder = nodes.follow(positive, ("conditioning", "conditioning_to", "conditioning_1"),
                           ("CLIPTextEncode", "CLIPTextEncodeSDXL"))
    if encoder is None:
        return {}
    last = nodes.follow(nodes.inputs(encoder).get("clip"), ("clip",), ("CLIPSetLastLayer",))
    layer = nodes.inputs(last).get("stop_at_clip_layer") if last is not None else None
    return {"clip_skip": -int(layer)} if isinstance(layer, int) and layer < 0 else {}


def _lora_tags(nodes: _Graph, model: Any) -> str:
    """The LoraLoader nodes of the model chain as A1111 tags, nearest the checkpoint first."""
    tags = []
    key = nodes.linked(model)
    for _ in range(64):
        if key is None or nodes.kind(key) not in ("LoraLoader", "LoraLoaderModelOnly"):
            break
        inputs = nodes.inputs(key)
        name = PurePosixPath(str(inputs.get("lora_name", "")).replace("\\", "/")).stem
        unet = float(inputs.get("strength_model", 1.0))
        tags.append(lora_tag(name, float(inputs.get("strength_clip", 0.0)), unet))  # ModelOnly: no CLIP
        key = nodes.linked(inputs.get("model"))
    return "".join(f" {tag}" for tag in reversed(tags))


def _hires_pass(nodes: _Graph, samplers: list[str]) -> dict[str, Any]:
    """A second sampler whose latent is the first one's output upscaled by LatentUpscaleBy."""
    for key in samplers[1:]:
        second = nodes.inputs(key)
        upscale = nodes.linked(second.get("latent_image"))
        if upscale is None or nodes.kind(upscale) != "LatentUpscaleBy":
            continue
        if nodes.linked(nodes.inputs(upscale).get("samples")) != samplers[0]:
            continue
        method = nodes.inputs(upscale).get("upscale_method", "nearest-exact")
        return {"hires_scale": nodes.inputs(upscale).get("scale_by"), "hires_steps": second.get("steps"),
                "hires_denoise": second.get("denoise"), "hires_upscaler": _COMFY_UPSCALE.get(method, "Latent")}
    return {}


def model_note(replay: Replay, model: str, parameters: str) -> str | None:
    """A note when the picture drawn again (its `parameters`) used another model than the
    PNG's: by `Model hash` where both have one, else by name."""
    drawn = png.parse_parameters(parameters)
    if replay.model_hash and drawn.get("Model hash"):
        if replay.model_hash.lower() == drawn["Model hash"].lower():
            return None
        return (f"the PNG was drawn with {replay.model or 'another model'} (hash {replay.model_hash}); "
                f"{model} has hash {drawn['Model hash']}")
    if replay.model and replay.model != drawn.get("Model"):
        return f"the PNG was drawn with the model {replay.model}; drawn here with {model}"
    return None
