"""Does a VAE fit a base model? `check_vae(base, vae)` answers match | mismatch | incompatible.

1. Architecture (no numbers run): the candidate's latent channel count must be the base's,
   and when the base carries a VAE, the candidate must have exactly its tensors and
   shapes (the LDM key set). Anything else is *incompatible*: it cannot be swapped in.
2. Latent space, decided numerically on fixed synthetic probe images (colour fields,
   gradients, shapes, stripes, a checkerboard, noise textures) at the size the UNet works
   at (sample_size latents × the VAE's downsampling, capped at MAX_IMAGE_SIZE):
   - *denoising*: the base UNet predicts the noise added to the candidate's latents (scaled
     by the base's scaling factor) at TIMESTEPS with the unconditional context (the
     empty prompt; zeros for SDXL, as its pipelines and training use). Its error is
     divided by that of an oracle that knows only each latent channel's mean and variance
     (Wiener filter: error ᾱσ²/(ᾱσ²+1−ᾱ)): the `score`. With a base VAE, the same numbers
     on the base's own latents (same noise) give the reference: `ratio` = candidate score
     / base score. Without one, the oracle is the reference (see max_denoise_score).
   - *latents* (base VAE only): cosine similarity of the two encoders' latents, per-channel
     mean and std side by side;
   - *decoding*: PSNR of each VAE's round trip, and of the candidate's decoder on the base
     encoder's latents (a decoder from another latent space draws garbage from them).
   Verdict *mismatch* when any test fails its threshold (THRESHOLDS, below), else *match*.
   FLUX.1 bases (`vae_check_flow.py`): the transformer's velocity error on noised
   normalised latents, against the same references; other transformer families and lone
   diffusion models without their text encoders get the headers' verdict (`vae_fit`).
3. fp16 safety: the candidate encodes and decodes the probes in float16 (torch runs fp16
   convolutions on CPU); NaN/Inf there is the SDXL-VAE problem sdxl-vae-fp16-fix solves.
   The largest activation of the float32 run is reported too (float16 ends at 65504).
4. The scaling factor the base uses (its VAE config, --config, else the family's), the
   measured 1/std of the candidate's latents beside it, and the file's identity when its
   sha256 is a well-known VAE (`vae_table`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdkit.arch import FAMILIES, Identity, identify
from sdkit.arch.vae_fit import vae_fit
from sdkit.errors import SdkitError, with_article
from sdkit.io import ModelFile, open_model
from sdkit.ops.layout import extract_component
from sdkit.ops.recipe_meta import input_sha256
from sdkit.ops.vae.swap import VaeSource, open_vae_source, vae_config
from sdkit.runtime.vae_check_flow import (
    FlowDenoiser,
    denoising_scores,
    flow_denoising,
    load_flow_base,
)
from sdkit.runtime.vae_table import known_vae

TIMESTEPS = (100, 300, 500, 700)
MAX_IMAGE_SIZE = 256
FP16_MAX = 65504.0
THRESHOLDS = {
    # candidate denoising score / base denoising score; the base's own VAE gives 1.0
    "max_denoise_ratio": 1.25,
    # Without a base VAE: UNet error / per-channel oracle error on the candidate's latents.
    # The oracle is the best denoiser that knows only each channel's mean and variance, so
    # a UNet denoises the latent space it was trained on at least as well (score <= 1, far
    # below on pictures like those it learned), while latents from another space are
    # foreign to it and it does worse than the oracle. The 15 % above 1 is for probes far
    # from what a model learned: on toy models that only know shapes on plain backgrounds
    # (toy-sd1, toy-sd1-b, toy-sdxl), their own VAEs score 0.82-1.05 and VAEs trained
    # separately on the same pictures 1.29-2.47 (the lowest, 1.29, from one whose channels
    # happen to line up with the base VAE's; compared with the base VAE its ratio is 1.30).
    "max_denoise_score": 1.15,
    # mean cosine similarity of the candidate's and the base's latents (same images)
    "min_latent_cosine": 0.8,
    # dB the candidate's decoder may lose against the base decoder on the base's latents
    "max_cross_decode_loss_db": 6.0,
}


@dataclass
class VaeCheckReport:
    verdict: str  # "match" | "mismatch" | "incompatible"
    reasons: list[str]
    base: dict[str, Any]
    candidate: dict[str, Any]
    architecture: dict[str, Any]
    scaling: dict[str, Any] = field(default_factory=dict)
    latents: dict[str, Any] | None = None
    denoising: dict[str, Any] | None = None
    reconstruction: dict[str, Any] | None = None
    fp16: dict[str, Any] = field(default_factory=lambda: {"status": "not tested"})
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": self.reasons, "base": self.base,
                "candidate": self.candidate, "architecture": self.architecture, "scaling": self.scaling,
                "latents": self.latents, "denoising": self.denoising,
                "reconstruction": self.reconstruction, "fp16": self.fp16, "thresholds": self.thresholds}


# ---- probe images ----------------------------------------------------------------------

Colour = tuple[float, float, float]


def probe_images(size: int) -> torch.Tensor:
    """Twelve deterministic pictures (N, 3, size, size) in [-1, 1]: four colour fields, two
    gradients, two shapes, a checkerboard, stripes, a smooth and a per-pixel noise texture."""
    generator = torch.Generator().manual_seed(20240611)
    axis = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")

    def plain(rgb: Colour) -> torch.Tensor:
        return torch.tensor(rgb).view(3, 1, 1).expand(3, size, size)

    def shape(background: Colour, mask: torch.Tensor, rgb: Colour) -> torch.Tensor:
        return torch.where(mask, plain(rgb), plain(background))

    circle = (x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.09
    square = ((x - 0.5).abs() < 0.28) & ((y - 0.5).abs() < 0.28)
    cells = max(2, size // 8)
    checker = ((x * cells).floor() + (y * cells).floor()) % 2 == 1
    stripes = 0.5 + 0.5 * torch.sin(x * 18.85 + y * 6.28) * plain((1.0, 0.6, 0.2))
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=(size, size),
                                             mode="bicubic", align_corners=True)[0].clamp(0, 1)
    images = [
        plain((0.5, 0.5, 0.5)), plain((0.86, 0.12, 0.12)), plain((0.12, 0.24, 0.86)), plain((0.94, 0.82, 0.0)),
        torch.stack([x, x, x]), torch.stack([x, y, 1 - x]),
        shape((1.0, 1.0, 1.0), circle, (0.86, 0.12, 0.12)), shape((0.1, 0.1, 0.1), square, (0.08, 0.75, 0.82)),
        shape((0.95, 0.95, 0.95), checker, (0.05, 0.05, 0.05)), stripes,
        smooth, torch.rand(3, size, size, generator=generator),
    ]
    return torch.stack(images) * 2 - 1


# ---- the base model ------------------------------------------------------------------------

@dataclass
class _Denoiser:
    """What the numeric tests need from the base model."""

    unet: Any
    tokenizer: Any | None  # None for SDXL: its unconditional context is zeros
    text_encoder: Any | None
    alphas_cumprod: torch.Tensor
    prediction: str  # "epsilon" | "v_prediction"
    scaling_factor: float
    scaling_source: str
    vae: Any | None  # the base's own AutoencoderKL, when it carries one
    context: torch.Tensor | None = None  # (1, tokens, width), set once the probe size is known
    added: dict[str, torch.Tensor] | None = None  # SDXL text_time conditioning

    def probe_size(self, vae: Any, cap: int) -> int:
        """sample_size latents in pixels, capped; a multiple of what both models downsample by."""
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        step = vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        wanted = min(int(self.unet.config.sample_size) * vae_factor, cap)
        return max(step, wanted // step * step)

    def condition(self, size: int) -> None:
        """The unconditional context: the empty prompt; for SDXL zeros, as its pipelines encode
        an empty negative prompt and as it trained on dropped captions (size ids: the probes')."""
        config = self.unet.config
        if self.tokenizer is None:
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            self.context = torch.zeros(1, 77, config.cross_attention_dim)
            self.added = {"text_embeds": torch.zeros(1, pooled),
                          "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}
            return
        tokenizer = self.tokenizer
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        self.context = self.text_encoder(ids)[0]


def _alphas(scheduler_config: dict[str, Any]) -> torch.Tensor:
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config}).alphas_cumprod


def _scaling(identity: Identity, config: dict[str, Any] | None, source: str) -> tuple[float, str]:
    if config and "scaling_factor" in config:
        return float(config["scaling_factor"]), source
    return FAMILIES[identity.family].vae_scaling_factor, f"the {identity.family} family default"


def _load_base(path: Path, identity: Identity, config: Path | None) -> _Denoiser:
    """The base's UNet, text encoder and VAE (None when it carries none) as the runtime
    loader builds them; without a VAE the scaling factor comes from --config's, else the family."""
    from sdkit.runtime.pipeline import load_model, read_config_folder

    loaded = load_model(path, config=config, device="cpu", dtype="fp32", require_vae=False)
    pipe = loaded.pipe
    if pipe.vae is not None:
        scale, source = _scaling(identity, dict(pipe.vae.config), "the base's VAE config")
    else:
        given = read_config_folder(config).get("vae") if config is not None else None
        scale, source = _scaling(identity, given, "--config's VAE config")
    sdxl = identity.family == "sdxl-base"
    return _Denoiser(pipe.unet, None if sdxl else pipe.tokenizer, None if sdxl else pipe.text_encoder,
                     _alphas(loaded.scheduler_config), loaded.scheduler_config.get("prediction_type", "epsilon"),
                     scale, source, pipe.vae)


def _module(module: torch.nn.Module, tensors: dict[str, Any], component: str) -> torch.nn.Module:
    head = component + "/"
    own = module.state_dict()
    state = {}
    for name, lazy in tensors.items():
        key = name[len(head):].removeprefix("text_model.") if name.startswith(head) else None
        if key in own:
            state[key] = lazy.load().float()
    missing = [key for key in own if key not in state and not key.endswith("position_ids")]
    if missing:
        raise SdkitError(f"{component}: {len(missing)} weights missing, e.g. {missing[0]}")
    module.load_state_dict(state, strict=False)
    return module.eval().requires_grad_(False)


# ---- architecture ------------------------------------------------------------------------

def _shapes(model: ModelFile, identity: Identity | None = None) -> dict[str, tuple[int, ...]]:
    """The model's VAE as LDM keys without prefix -> shape."""
    tensors = extract_component(model, "vae", "ldm", identity=identity)
    return {key: lazy.shape for key, lazy in tensors.items()}


def _architecture(base: ModelFile, base_identity: Identity, source: VaeSource) -> dict[str, Any]:
    """Whether the candidate can stand in for the base's VAE, and what does not fit."""
    problems: list[str] = []
    candidate = _shapes(source.model, source.identity)
    latent = candidate.get("decoder.conv_in.weight", (0, 0))[1]
    wanted = base_identity.facts.get("latent_channels") or FAMILIES[base_identity.family].latent_channels
    if latent != wanted:
        problems.append(f"{latent} latent channels, the base's UNet works on {wanted}")
    for key, channels in (("encoder.conv_in.weight", 1), ("decoder.conv_out.weight", 0)):
        if key in candidate and candidate[key][channels] != 3:
            problems.append(f"{key} works on {candidate[key][channels]} image channels, not RGB")
    reference = _shapes(base, base_identity) if "vae" in base_identity.components else None
    if reference is not None and not problems:
        missing = sorted(set(reference) - set(candidate))
        extra = sorted(set(candidate) - set(reference))
        shapes = sorted(k for k in set(reference) & set(candidate) if reference[k] != candidate[k])
        for count, what, keys in ((len(missing), "tensors of the base's VAE missing", missing),
                                  (len(extra), "tensors the base's VAE does not have", extra),
                                  (len(shapes), "tensors shaped differently from the base's VAE", shapes)):
            if count:
                problems.append(f"{count} {what} (e.g. {keys[0]})")
    return {"fits": not problems, "problems": problems, "latent_channels": latent,
            "expected_latent_channels": wanted, "compared_with_base_vae": reference is not None}


def _own_vae_config(model: ModelFile) -> dict[str, Any] | None:
    """The config.json of a VAE given as a folder: a lone component folder's or a pipeline's vae/."""
    configs = (model.extra.get("configs") or {}) if model.components else {}
    if model.extra.get("model_index") is None and len(configs) == 1:
        return next(iter(configs.values()))
    return configs.get("vae")


def _candidate_module(source: VaeSource, base_vae: Any | None, config: Path | None) -> Any:
    """The candidate as an AutoencoderKL: its own config.json, else --config's VAE config,
    else the base VAE's (same shapes, so the same architecture), else read off its shapes."""
    from diffusers import AutoencoderKL

    from sdkit.runtime.pipeline import read_config_folder

    chosen = _own_vae_config(source.model)
    if chosen is None and config is not None:
        chosen = read_config_folder(config).get("vae")
    if chosen is None and base_vae is not None:
        chosen = dict(base_vae.config)
    chosen = dict(chosen or vae_config(source.model, source.identity))
    tensors = extract_component(source.model, "vae", "diffusers", identity=source.identity,
                                configs={"vae": chosen})
    try:
        module = AutoencoderKL.from_config(chosen)
    except ValueError as exc:
        raise SdkitError(f"{source.model.path}: cannot build this VAE from its shapes alone ({exc}); "
                         "pass --config DIR with a diffusers folder of its model") from None
    return _module(module, {f"vae/{k}": v for k, v in tensors.items()}, "vae")


# ---- measurements ------------------------------------------------------------------------

def _encode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mean


def _round_trip(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(posterior means, decoded images, largest |value| any layer produced on the way)."""
    peak = [0.0]

    def record(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            peak[0] = max(peak[0], float(output.detach().abs().max()))

    hooks = [m.register_forward_hook(record) for m in vae.modules() if not list(m.children())]
    try:
        latents = _encode(vae, images)
        decoded = vae.decode(latents).sample
    finally:
        for hook in hooks:
            hook.remove()
    return latents, decoded, peak[0]


def _psnr(images: torch.Tensor, decoded: torch.Tensor) -> float:
    """Mean over the images of each one's PSNR (pixels in [-1, 1])."""
    mse = torch.mean((decoded.clamp(-1, 1) - images) ** 2, dim=(1, 2, 3)).clamp_min(1e-10)
    return float(torch.mean(10 * torch.log10(4.0 / mse)))


def _latent_stats(latents: torch.Tensor) -> dict[str, list[float]]:
    return {"channel_mean": [round(v, 4) for v in latents.mean(dim=(0, 2, 3)).tolist()],
            "channel_std": [round(v, 4) for v in latents.std(dim=(0, 2, 3)).tolist()]}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def _oracle_errors(latents: torch.Tensor, alphas: list[float]) -> list[float]:
    """Noise-prediction error of the best estimator knowing only per-channel mean and variance."""
    variance = latents.var(dim=(0, 2, 3))
    return [float((a * variance / (a * variance + 1 - a)).mean()) for a in alphas]


def _denoise_errors(denoiser: _Denoiser, sets: list[torch.Tensor], timesteps: tuple[int, ...]) -> list[list[float]]:
    """eps-prediction MSE of the base UNet on each set of (scaled) latents at each timestep;
    every set gets the same noise, and all sets run in one batch."""
    assert denoiser.context is not None  # set by `condition`
    latents = torch.cat(sets)
    batch = len(latents)
    context = denoiser.context.expand(batch, -1, -1)
    added = {k: v.expand(batch, -1) for k, v in denoiser.added.items()} if denoiser.added else None
    errors: list[list[float]] = [[] for _ in sets]
    for step in timesteps:
        noise = torch.randn(sets[0].shape, generator=torch.Generator().manual_seed(step)).repeat(len(sets), 1, 1, 1)
        alpha = denoiser.alphas_cumprod[step]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        output = denoiser.unet(noisy, torch.full((batch,), step), encoder_hidden_states=context,
                               added_cond_kwargs=added).sample
        if denoiser.prediction == "v_prediction":
            output = alpha.sqrt() * output + (1 - alpha).sqrt() * noisy
        for index, part in enumerate(((output - noise) ** 2).chunk(len(sets))):
            errors[index].append(float(part.mean()))
    return errors


def _denoising(denoiser: _Denoiser, candidate: torch.Tensor, base: torch.Tensor | None,
               timesteps: tuple[int, ...]) -> dict[str, Any]:
    alphas = [float(denoiser.alphas_cumprod[t]) for t in timesteps]
    named = {"candidate": candidate * denoiser.scaling_factor}
    if base is not None:
        named["base"] = base * denoiser.scaling_factor
    errors = _denoise_errors(denoiser, list(named.values()), timesteps)
    return denoising_scores(("timesteps", list(timesteps)), named, errors,
                            lambda latents: _oracle_errors(latents, alphas))


def _fp16(vae: Any, images: torch.Tensor, peak: float) -> dict[str, Any]:
    """Encode and decode in float16; `peak` is the float32 round trip's largest activation."""
    import copy

    result: dict[str, Any] = {"dtype": "float16", "peak_activation_fp32": round(peak, 1), "fp16_max": FP16_MAX}
    try:
        half = copy.deepcopy(vae).half()
        latents = _encode(half, images.half())
        decoded = half.decode(latents).sample
    except (RuntimeError, NotImplementedError) as exc:
        result.update(status="not tested", reason=f"float16 does not run here ({exc.__class__.__name__})")
        return result
    encode_ok = bool(torch.isfinite(latents).all())
    decode_ok = bool(torch.isfinite(decoded).all())
    result.update(encode_finite=encode_ok, decode_finite=decode_ok,
                  status="ok" if encode_ok and decode_ok else "nan")
    if not (encode_ok and decode_ok):
        result["advice"] = ("this VAE overflows in float16 (NaN/Inf): decode in float32 (A1111 --no-half-vae, "
                            "diffusers force_upcast) or use an fp16-fixed VAE such as sdxl-vae-fp16-fix for SDXL")
    elif peak > FP16_MAX / 4:
        result["advice"] = "activations come within 4x of the float16 limit: other images may overflow"
    return result


# ---- the check ---------------------------------------------------------------------------

NUMERIC_FAMILIES = ("sd1", "sd2", "sdxl-base")
FLOW_NUMERIC_FAMILIES = ("flux",)  # rectified-flow transformers sdkit runs (`vae_check_flow`)


def _require_base(path: Path, identity: Identity) -> None:
    if identity.kind not in ("checkpoint", "unet") or not set(identity.components) & {"unet", "transformer"}:
        raise SdkitError(f"{path}: not a base model with a diffusion model (identified as {identity.kind})")
    if identity.family not in FAMILIES:
        raise SdkitError(f"{path}: unknown model family; cannot tell which VAEs fit it")


def _runs_numerically(identity: Identity, text_encoders: Sequence[str | os.PathLike[str]]) -> bool:
    """The latent-space measurement runs a UNet checkpoint of the families sdkit samples,
    and a FLUX.1 transformer with its text encoders (its folder's, or given as files)."""
    if identity.family in FLOW_NUMERIC_FAMILIES:
        return identity.kind == "checkpoint" or bool(text_encoders)
    return identity.family in NUMERIC_FAMILIES and identity.kind == "checkpoint"


def _weights_file(path: Path) -> Path | None:
    """The file whose sha256 names a VAE: the file itself, or a VAE folder's weights file."""
    from sdkit.io.diffusers_folder import find_weights

    if path.is_file():
        return path
    folder = path / "vae" if (path / "model_index.json").is_file() else path
    weights = find_weights(folder) if folder.is_dir() else None
    return weights if weights is not None and not weights.name.endswith(".json") else None


def _candidate_facts(path: Path, source: VaeSource) -> dict[str, Any]:
    weights = _weights_file(path)
    sha256 = input_sha256(weights) if weights is not None else None
    known = known_vae(sha256)
    return {"path": str(path), "sha256": sha256, "hashed_file": str(weights) if weights else None,
            "key_convention": source.identity.key_convention, "known": known.to_json() if known else None,
            "dropped_leftovers": source.dropped}


def check_vae(base: str | os.PathLike[str], vae: str | os.PathLike[str], *,
              config: str | os.PathLike[str] | None = None, timesteps: tuple[int, ...] = TIMESTEPS,
              max_image_size: int = MAX_IMAGE_SIZE, fp16: bool = True,
              text_encoders: Sequence[str | os.PathLike[str]] = ()) -> VaeCheckReport:
    """Check whether `vae` fits the base model `base` (see the module notes for how).

    `config`: a local diffusers folder of the base's architecture, for what single files
    cannot tell (tokenizer, norm groups and heads of non-standard models, scaling factor).
    `text_encoders`: the text encoder files of a FLUX.1 diffusion model given alone (with
    `config` for its configs and tokenizers), so that its latent space can be measured.
    """
    base_path, vae_path = Path(base), Path(vae)
    config_dir = Path(config) if config is not None else None
    with open_model(base_path) as model, open_vae_source(vae_path) as source:
        identity = identify(model)
        _require_base(base_path, identity)
        if not _runs_numerically(identity, text_encoders):
            return _check_by_headers(base_path, identity, vae_path, source)
        if identity.variant != "normal":
            raise SdkitError(f"{base_path}: {with_article(identity.variant)} model; the numeric VAE check "
                             "runs on text-to-image models")
        flow = identity.family in FLOW_NUMERIC_FAMILIES
        report = VaeCheckReport("incompatible", [], base=_base_facts(base_path, identity),
                                candidate=_candidate_facts(vae_path, source),
                                architecture=_header_architecture(identity, source) if flow
                                else _architecture(model, identity, source))
        if not report.architecture["fits"]:
            report.reasons = list(report.architecture["problems"])
            return report
        if flow:
            denoiser: Any = load_flow_base(base_path, config_dir, text_encoders, vae_path, "vae" in identity.components)
        else:
            denoiser = _load_base(base_path, identity, config_dir)
        with torch.no_grad():
            _measure(report, denoiser, source, config_dir, timesteps, max_image_size, fp16)
    report.verdict, report.reasons = _verdict(report)
    return report


def _base_facts(path: Path, identity: Identity) -> dict[str, Any]:
    return {"path": str(path), "family": identity.family, "release": identity.facts.get("release"),
            "has_vae": "vae" in identity.components, "prediction": identity.prediction}


def _header_architecture(identity: Identity, source: VaeSource) -> dict[str, Any]:
    """What the headers say (`sdkit.arch.vae_fit`): latent channels and VAE design."""
    fit = vae_fit(identity, source.identity)
    return {"fits": fit.fits, "problems": fit.problems, "latent_channels": fit.latent_channels,
            "expected_latent_channels": fit.expected_latent_channels, "compared_with_base_vae": False,
            "video": bool((source.identity.facts.get("vae") or {}).get("video")),
            "shared_design": list(fit.shared_design)}


def _check_by_headers(base_path: Path, identity: Identity, vae_path: Path, source: VaeSource) -> VaeCheckReport:
    """Bases whose diffusion model sdkit does not run here (transformer families, lone
    diffusion models without their text encoders): the verdict is the headers'."""
    architecture = _header_architecture(identity, source)
    report = VaeCheckReport("incompatible", list(architecture["problems"]), base=_base_facts(base_path, identity),
                            candidate=_candidate_facts(vae_path, source), architecture=architecture)
    report.fp16 = {"status": "not tested", "reason": "the diffusion model was not run"}
    if architecture["fits"]:
        title = FAMILIES[identity.family].title
        report.verdict = "match"
        report.reasons = [f"{architecture['latent_channels']} latent channels and the VAE design {title} uses"]
        if architecture["shared_design"]:
            others = ", ".join(FAMILIES[name].title for name in architecture["shared_design"])
            verb = "uses" if len(architecture["shared_design"]) == 1 else "use"
            report.reasons.append(f"{others} {verb} a VAE of the same design in another latent space: the "
                                  "weights were not measured, so this also passes such a VAE")
            if identity.family in FLOW_NUMERIC_FAMILIES:
                report.reasons.append("to measure them, give the diffusion model its text encoders "
                                      "(--text-encoder FILE, twice) and --config DIR")
    return report


def _measure(report: VaeCheckReport, denoiser: Any, source: VaeSource, config: Path | None,
             timesteps: tuple[int, ...], max_image_size: int, fp16: bool) -> None:
    """`denoiser`: the base as a `_Denoiser` (UNet) or a `FlowDenoiser` (transformer)."""
    flow = isinstance(denoiser, FlowDenoiser)
    candidate = _candidate_module(source, denoiser.vae, config)
    size = denoiser.probe_size(candidate, max_image_size)
    denoiser.condition(size)
    images = probe_images(size)
    latents, decoded, peak = _round_trip(candidate, images)
    report.scaling = {"factor": denoiser.scaling_factor, "source": denoiser.scaling_source,
                      "candidate_config_factor": candidate.config.scaling_factor,
                      "measured_candidate": round(1 / float(latents.std()), 5), "probe_size": size}
    if flow:
        report.scaling.update(shift=denoiser.shift_factor, measured_candidate_mean=round(float(latents.mean()), 5))
    report.latents = {"candidate": _latent_stats(latents)}
    report.reconstruction = {"candidate_psnr": round(_psnr(images, decoded), 2)}
    base_latents = None
    if denoiser.vae is not None:
        base_latents = _encode(denoiser.vae, images)
        report.scaling["measured_base"] = round(1 / float(base_latents.std()), 5)
        report.latents.update(base=_latent_stats(base_latents), cosine=round(_cosine(latents, base_latents), 4))
        base_psnr = _psnr(images, denoiser.vae.decode(base_latents).sample)
        cross_psnr = _psnr(images, candidate.decode(base_latents).sample)
        report.reconstruction.update(base_psnr=round(base_psnr, 2), cross_psnr=round(cross_psnr, 2),
                                     cross_loss_db=round(base_psnr - cross_psnr, 2))
    if flow:
        report.denoising = flow_denoising(denoiser, latents, base_latents)
    else:
        report.denoising = _denoising(denoiser, latents, base_latents, timesteps)
    report.fp16 = _fp16(candidate, images, peak) if fp16 else {"status": "not tested", "reason": "skipped on request"}


def _verdict(report: VaeCheckReport) -> tuple[str, list[str]]:
    limits, failed, passed = report.thresholds, [], []
    denoising = report.denoising or {}
    error = "transformer's velocity error" if "sigmas" in denoising else "UNet's noise error"
    if "ratio" in denoising:
        ratio, limit = denoising["ratio"], limits["max_denoise_ratio"]
        line = f"the base {error} on its latents is {ratio:.2f}x that on the base VAE's (limit {limit})"
        (failed if ratio > limit else passed).append(line)
    else:
        score, limit = denoising["candidate_score"], limits["max_denoise_score"]
        line = (f"the base {error} on its latents is {score:.2f} of what per-channel statistics "
                f"alone give (limit {limit})")
        (failed if score > limit else passed).append(line)
    cosine = (report.latents or {}).get("cosine")
    if cosine is not None:
        limit = limits["min_latent_cosine"]
        line = f"its latents have cosine similarity {cosine:.3f} with the base VAE's (limit {limit})"
        (failed if cosine < limit else passed).append(line)
    loss = (report.reconstruction or {}).get("cross_loss_db")
    if loss is not None:
        limit = limits["max_cross_decode_loss_db"]
        line = f"its decoder loses {loss:.1f} dB against the base decoder on the base's latents (limit {limit})"
        (failed if loss > limit else passed).append(line)
    return ("mismatch", failed) if failed else ("match", passed)
