"""What a training run is asked to do: one `TrainConfig`, checked before any work starts.

The options follow the names of diffusers' example trainers and kohya's sd-scripts where
they exist (research: train.md §1-2); defaults are the small, safe ones of those scripts
(LoRA rank 4 with alpha = rank, AdamW with weight decay 1e-2, gradient clipping at 1.0,
constant learning rate).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdkit.errors import SdkitError, with_article

METHODS = ("lora", "loha", "lokr", "ti", "hypernet", "dreambooth")
NETWORK_METHODS = ("lora", "loha", "lokr")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion", "adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CROPS = ("center", "random")
CACHES = ("memory", "disk", "off")
PREDICTIONS = ("epsilon", "v_prediction")
DREAMBOOTH_FORMATS = ("single-file", "diffusers")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal", "shift")  # flow-matching bases (FLUX.1)
DEFAULT_FLOW_SHIFT = 3.0  # kohya's --discrete_flow_shift
LORA_LAYOUTS = ("kohya", "diffusers")
FLOW_METHODS = ("lora", "lokr")
MAX_VECTORS = 75  # a CLIP prompt chunk holds 75 tokens: A1111's most vectors per embedding
DEFAULT_CLASS_IMAGES = 50
DEFAULT_PRIOR_LOSS_WEIGHT = 1.0


@dataclass
class DataOptions:
    """Where the pictures are and how they become training samples."""

    folder: Path
    resolution: int | None = None  # None: the model's native size
    buckets: bool = True
    bucket_step: int | None = None  # None: VAE factor x UNet downsampling
    crop: str = "center"
    min_width: int = 0
    min_height: int = 0
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None
    cache: str = "memory"
    cache_dir: Path | None = None  # disk cache; None: <folder>/.sdkit-latents
    caption_dropout: float = 0.0
    repeats: int = 1
    trigger: str | None = None
    dataset_config: Path | None = None  # a kohya dataset TOML (sdkit.runtime.train.datasets)
    reg_folder: Path | None = None  # kohya regularization images (N_class folders)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False


@dataclass
class OptimOptions:
    """Steps, batches, optimizer and learning-rate schedule."""

    steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None: lr
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    unet_lr: float | None = None  # kohya's --unet_lr: the denoiser's rate, --lr staying the others' default

    def __post_init__(self) -> None:
        # --lr is the default of every part; --unet-lr takes the denoiser's over (idempotent)
        if self.unet_lr is not None and self.unet_lr != self.lr:
            self.text_encoder_lr = self.text_encoder_lr if self.text_encoder_lr is not None else self.lr
            self.lr = self.unet_lr


@dataclass
class LossOptions:
    prediction_type: str | None = None  # None: the base's scheduler config
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str | None = None  # flow-matching bases; None: uniform
    flow_shift: float | None = None  # --timestep-sampling shift; None: DEFAULT_FLOW_SHIFT

    @property
    def shift(self) -> float:
        return self.flow_shift if self.flow_shift is not None else DEFAULT_FLOW_SHIFT


@dataclass
class NetworkOptions:
    """LoRA / LoHa / LoKr."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank
    dropout: float = 0.0
    train_text_encoder: bool = False
    layout: str = "kohya"  # kohya (what A1111 / ComfyUI load) | diffusers (peft names)
    conv_dim: int | None = None  # kohya's conv_dim: LoCon on 3x3 convolutions too
    conv_alpha: float | None = None  # None: 1.0, kohya's default
    preset: str | None = None  # LyCORIS preset of loha / lokr targets; None: kohya's networks.lora set


@dataclass
class EmbeddingOptions:
    """Textual inversion."""

    token: str | None = None  # None: the output's file name
    init_word: str = "*"
    vectors: int = 1


@dataclass
class HypernetOptions:
    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation: str = "linear"
    layer_norm: bool = False
    dropout: bool = False
    weight_init: str = "Normal"


@dataclass
class DreamBoothOptions:
    class_prompt: str | None = None  # None: no prior preservation
    class_dir: Path | None = None  # None: <output>.class-images
    num_class_images: int | None = None  # None: DEFAULT_CLASS_IMAGES
    prior_loss_weight: float | None = None  # None: DEFAULT_PRIOR_LOSS_WEIGHT
    train_text_encoder: bool = False
    format: str = "single-file"

    @property
    def class_image_count(self) -> int:
        return self.num_class_images if self.num_class_images is not None else DEFAULT_CLASS_IMAGES

    @property
    def prior_weight(self) -> float:
        return self.prior_loss_weight if self.prior_loss_weight is not None else DEFAULT_PRIOR_LOSS_WEIGHT


@dataclass
class RunOptions:
    """Device, precision, seed, checkpoints and previews."""

    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    save_precision: str | None = None  # None: fp16 for checkpoints, fp32 for adapters
    save_every: int = 0  # training state every N steps (0: never)
    state_dir: Path | None = None  # None: <output>.state
    resume: Path | None = None
    preview_every: int = 0
    preview_prompts: tuple[str, ...] = ()
    preview_seeds: int = 1
    sample_steps: int = 20  # sampling steps of previews and class pictures
    overwrite: bool = False
    save_every_n_epochs: int = 0  # OUT-00000N.safetensors after every N epochs (kohya's names)
    log_dir: Path | None = None  # scalars for TensorBoard (and scalars.csv)
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None


@dataclass
class TrainConfig:
    method: str
    base: Path
    output: Path
    data: DataOptions
    config_dir: Path | None = None  # a local diffusers folder of the base's family
    optim: OptimOptions = field(default_factory=OptimOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    hypernet: HypernetOptions = field(default_factory=HypernetOptions)
    dreambooth: DreamBoothOptions = field(default_factory=DreamBoothOptions)
    run: RunOptions = field(default_factory=RunOptions)
    # a diffusion model alone (FLUX.1): its VAE and text encoder files
    vae: Path | None = None
    text_encoders: tuple[Path, ...] = ()

    def to_json(self, *, recorded: bool = False) -> dict[str, Any]:
        """The options that matter for this method, JSON-ready (paths as strings; with
        `recorded`, as metadata records them: file and folder names, see `recorded_path`)."""
        from sdkit.ops.recipe_meta import recorded_path

        def path_text(value: Any) -> str:
            return recorded_path(value) if recorded and isinstance(value, Path) else str(value)

        record = json.loads(json.dumps(asdict(self), default=path_text))
        unused = {"network": NETWORK_METHODS, "embedding": ("ti",), "hypernet": ("hypernet",),
                  "dreambooth": ("dreambooth",)}
        for group, methods in unused.items():
            if self.method not in methods:
                del record[group]
        return record

    @property
    def state_dir(self) -> Path:
        return self.run.state_dir or self.output.with_name(self.output.name + ".state")

    @property
    def stem(self) -> Path:
        """The output path without its suffix: where the side files go."""
        return self.output.with_suffix("") if self.output.suffix else self.output

    @property
    def trains_text_encoder(self) -> bool:
        if self.method in NETWORK_METHODS:
            return self.network.train_text_encoder
        return self.method == "dreambooth" and self.dreambooth.train_text_encoder

    @property
    def token(self) -> str:
        return self.embedding.token or self.stem.name


def _choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SdkitError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def _at_least(what: str, value: float, low: float) -> None:
    if value < low:
        raise SdkitError(f"{what} must be at least {low:g}, not {value:g}")


def _probability(what: str, value: float) -> None:
    if not 0 <= value < 1:
        raise SdkitError(f"{what} must be in [0, 1), not {value:g}")


def check_config(config: TrainConfig) -> None:
    """Refuse contradictory, out-of-range or ignored options with one line naming the option."""
    _choice("method", config.method, METHODS)
    _check_data(config.data)
    _check_optim(config.optim)
    _check_loss(config.loss)
    _check_run(config.run)
    _check_output(config)
    _check_method_options(config)
    if config.method in NETWORK_METHODS:
        _at_least("--rank", config.network.rank, 1)
        _probability("--dropout", config.network.dropout)
        _choice("--layout", config.network.layout, LORA_LAYOUTS)
        if config.network.layout == "diffusers" and config.method != "lora":
            raise SdkitError(f"--layout diffusers holds plain LoRA modules; {config.method} files are written "
                             "in kohya / LyCORIS names")
        if config.network.alpha is not None and config.network.alpha <= 0:
            raise SdkitError(f"--alpha must be positive, not {config.network.alpha:g} "
                             "(the update is scaled by alpha / rank)")
    if config.method == "ti":
        _at_least("--vectors", config.embedding.vectors, 1)
        if config.embedding.vectors > MAX_VECTORS:
            raise SdkitError(f"--vectors must be at most {MAX_VECTORS} (each vector takes one of the "
                             f"{MAX_VECTORS} tokens of a prompt), not {config.embedding.vectors}")
        if not config.embedding.init_word.strip():
            raise SdkitError("--init-word must be a word")
    if config.method == "hypernet":
        _check_hypernet(config.hypernet)
    if config.method == "dreambooth":
        _check_dreambooth(config.dreambooth)
    from sdkit.runtime.train.kohya_options import check_kohya_options

    check_kohya_options(config)


def _ignored(option: str, why: str) -> SdkitError:
    return SdkitError(f"{option} {why}, so it would be ignored; drop it")


def _check_method_options(config: TrainConfig) -> None:
    """Options the chosen method would silently ignore."""
    method, run = config.method, config.run
    if method in ("ti", "hypernet") and config.network.train_text_encoder:
        raise _ignored("--train-text-encoder", f"applies to lora, loha, lokr and dreambooth, not {method}")
    if method == "hypernet" and run.save_precision is not None:
        raise _ignored("--save-precision", "does not apply to hypernetworks (their .pt files are written in float32)")
    if method != "dreambooth" and config.dreambooth.class_prompt is not None:
        raise _ignored("--class-prompt", f"applies to dreambooth, not {method}")


def check_family_options(config: TrainConfig, flow: bool) -> None:
    """Options the base's kind of model does not train with: DDPM's (prediction type,
    min-SNR, noise offset) on a flow-matching base, flow matching's on a DDPM one."""
    loss = config.loss
    if not flow:
        if loss.timestep_sampling is not None:
            raise _ignored("--timestep-sampling", "applies to flow-matching bases (FLUX.1)")
        if config.text_encoders:
            raise _ignored("--text-encoder", "gives a FLUX.1 diffusion model alone its text encoders")
        if config.vae is not None:
            raise _ignored("--vae", "gives a FLUX.1 diffusion model alone its VAE")
        return
    if config.method not in FLOW_METHODS:
        raise SdkitError(f"FLUX.1 bases train {' and '.join(FLOW_METHODS)}, not {config.method}")
    flow_matching = "FLUX.1 trains on flow matching (target noise - latents)"
    refused = (("--prediction-type", loss.prediction_type is not None, flow_matching),
               ("--min-snr-gamma", loss.min_snr_gamma is not None, flow_matching),
               ("--noise-offset", bool(loss.noise_offset), flow_matching),
               ("--train-text-encoder", config.network.train_text_encoder,
                "FLUX.1 trains its transformer alone, the text encoders frozen"),
               ("--preview-every", bool(config.run.preview_every), "FLUX.1 previews are not drawn while training"))
    for option, given, why in refused:
        if given:
            raise SdkitError(f"{option} does not apply to FLUX.1 bases ({why}); drop it")


def _check_dreambooth(options: DreamBoothOptions) -> None:
    _choice("--format", options.format, DREAMBOOTH_FORMATS)
    if options.class_prompt is None:
        given = [option for option, value in (("--class-dir", options.class_dir),
                                              ("--num-class-images", options.num_class_images),
                                              ("--prior-loss-weight", options.prior_loss_weight))
                 if value is not None]
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise SdkitError(f"{', '.join(given)} {verb} for prior preservation, which needs --class-prompt "
                             "(the prompt of the class pictures)")
    _at_least("--num-class-images", options.class_image_count, 1)
    _at_least("--prior-loss-weight", options.prior_weight, 0)


def _check_hypernet(options: HypernetOptions) -> None:
    """The MLP settings, checked before any model loads."""
    from sdkit.adapters.hypernet import WEIGHT_INITS, activation_classes

    structure = options.layer_structure
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or min(structure) <= 0:
        shown = ",".join(f"{value:g}" for value in structure)
        raise SdkitError(f"--layer-structure {shown}: must start and end with 1 and hold positive "
                         "width multipliers (e.g. 1,2,1)")
    _choice("--weight-init", options.weight_init, WEIGHT_INITS)
    if options.activation != "linear":
        found = activation_classes().get(options.activation)
        if found is None:
            raise SdkitError(f"--activation {options.activation!r} is unknown (A1111's names: linear, relu, "
                             "leakyrelu, elu, swish, tanh, sigmoid, or a torch.nn activation in lowercase)")
        try:
            found()  # A1111 builds activations without arguments
        except TypeError:
            raise SdkitError(f"--activation {options.activation!r} cannot be built without arguments") from None


def _check_data(data: DataOptions) -> None:
    if not data.folder.is_dir():
        raise SdkitError(f"{data.folder}: --data must be a folder of images")
    _choice("--crop", data.crop, CROPS)
    _choice("--cache-latents", data.cache, CACHES)
    if data.crop == "random" and data.cache != "off":
        raise SdkitError("--crop random draws a new crop every epoch, so latents cannot be cached; "
                         "add --cache-latents off")
    if data.cache_dir is not None and data.cache != "disk":
        raise _ignored("--cache-dir", f"is where --cache-latents disk keeps latents, and the cache is {data.cache}")
    if data.bucket_step is not None and not data.buckets:
        raise _ignored("--bucket-step", "sets the sides of aspect-ratio buckets, and --no-buckets turns them off")
    _probability("--caption-dropout", data.caption_dropout)
    _at_least("--repeats", data.repeats, 1)
    if data.resolution is not None:
        _at_least("--resolution", data.resolution, 8)
    low, high = data.min_aspect, data.max_aspect
    if (low is not None and low <= 0) or (high is not None and high <= 0) or \
            (low is not None and high is not None and low > high):
        raise SdkitError(f"--aspect-range {low}:{high} must be two positive ratios, the smaller first")


def _check_optim(optim: OptimOptions) -> None:
    _at_least("--steps", optim.steps, 1)
    _at_least("--batch-size", optim.batch_size, 1)
    _at_least("--grad-accum", optim.grad_accum, 1)
    _at_least("--warmup-steps", optim.warmup_steps, 0)
    _choice("--lr-scheduler", optim.lr_scheduler, LR_SCHEDULERS)
    _choice("--optimizer", optim.optimizer, OPTIMIZERS)
    if optim.lr <= 0 or (optim.text_encoder_lr is not None and optim.text_encoder_lr <= 0):
        raise SdkitError("learning rates must be positive")


def _check_loss(loss: LossOptions) -> None:
    if loss.prediction_type is not None:
        _choice("--prediction-type", loss.prediction_type, PREDICTIONS)
    if loss.timestep_sampling is not None:
        _choice("--timestep-sampling", loss.timestep_sampling, TIMESTEP_SAMPLINGS)
    if loss.flow_shift is not None:
        if loss.timestep_sampling != "shift":
            raise _ignored("--flow-shift", "shifts --timestep-sampling shift, which is not chosen")
        if loss.flow_shift <= 0:
            raise SdkitError(f"--flow-shift must be positive, not {loss.flow_shift:g}")
    if loss.min_snr_gamma is not None and loss.min_snr_gamma <= 0:
        raise SdkitError(f"--min-snr-gamma must be positive, not {loss.min_snr_gamma:g}")
    _at_least("--noise-offset", loss.noise_offset, 0)


def _check_run(run: RunOptions) -> None:
    _choice("--precision", run.precision, PRECISIONS)
    _choice("--device", run.device, ("auto", "cpu", "cuda"))
    if run.save_precision is not None:
        _choice("--save-precision", run.save_precision, SAVE_PRECISIONS)
    for what, value in (("--save-every", run.save_every), ("--preview-every", run.preview_every)):
        _at_least(what, value, 0)
    _at_least("--preview-seeds", run.preview_seeds, 1)
    if run.preview_every and not run.preview_prompts:
        raise SdkitError("--preview-every needs at least one --preview-prompt")
    if run.resume is not None and not (run.resume / "state.pt").is_file():
        raise SdkitError(f"{run.resume}: --resume needs a training-state folder (one with state.pt)")


_SUFFIXES = {"lora": (".safetensors",), "loha": (".safetensors",), "lokr": (".safetensors",),
             "ti": (".safetensors", ".pt"), "hypernet": (".pt",)}


def _check_output(config: TrainConfig) -> None:
    output = config.output
    if config.method == "dreambooth":
        allowed = ("",) if config.dreambooth.format == "diffusers" else (".safetensors",)
    else:
        allowed = _SUFFIXES[config.method]
    if output.suffix.lower() not in allowed:
        wanted = "a folder name without a suffix" if allowed == ("",) else " or ".join(allowed)
        raise SdkitError(f"{output}: {with_article(config.method)} output is {wanted}")
    if not output.parent.is_dir():
        raise SdkitError(f"{output.parent}: no such folder for the output")
    if output.exists() and not config.run.overwrite:
        raise SdkitError(f"{output}: already exists (overwriting needs --force)")
