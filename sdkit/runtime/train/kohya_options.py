"""Checks of the options that follow kohya sd-scripts: dataset layouts, caption tags, LoCon
convolutions, LyCORIS presets, optimizers, per-epoch saves, logs and metadata.

Each contradictory or ignored option is refused in one line naming it, before any model
loads (`check_config` calls `check_kohya_options`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from sdkit.errors import SdkitError
from sdkit.runtime.train.datasets import is_concept_folder

# the pip package each optional optimizer needs
OPTIMIZER_PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt"),
                      "lion": ("lion_pytorch", "lion-pytorch"), "adafactor": ("transformers", "transformers")}
# LyCORIS presets (lycoris/config.py PRESET) sdkit applies to LoHa / LoKr
LYCORIS_PRESETS = ("full", "attn-only", "attn-mlp", "unet-transformer-only", "unet-convblock-only")


def _ignored(option: str, why: str) -> SdkitError:
    return SdkitError(f"{option} {why}, so it would be ignored; drop it")


def check_kohya_options(config: Any) -> None:
    _check_data(config)
    _check_network(config)
    _check_optim(config.optim)
    _check_run(config.run)
    _check_epoch_files(config)


def _check_data(config: Any) -> None:
    data = config.data
    if data.keep_tokens < 0:
        raise SdkitError(f"--keep-tokens must be at least 0, not {data.keep_tokens}")
    if data.keep_tokens and not data.shuffle_caption and data.dataset_config is None:
        raise _ignored("--keep-tokens", "keeps tags in place while --shuffle-caption shuffles the rest, "
                       "and captions are not shuffled")
    if data.dataset_config is not None:
        if not data.dataset_config.is_file():
            raise SdkitError(f"{data.dataset_config}: no such dataset config file")
        given = [option for option, value in (("--shuffle-caption", data.shuffle_caption),
                                              ("--keep-tokens", data.keep_tokens), ("--flip-aug", data.flip_aug),
                                              ("--repeats", data.repeats != 1)) if value]
        if given:
            raise SdkitError(f"{', '.join(given)}: the dataset config sets these per subset "
                             "(shuffle_caption, keep_tokens, flip_aug, num_repeats); set them there")
    if data.repeats != 1 and data.dataset_config is None and is_concept_folder(data.folder):
        raise _ignored("--repeats", f"is set per folder by the N_ prefix of {data.folder}'s kohya subfolders")
    if data.reg_folder is not None:
        if config.method not in ("lora", "loha", "lokr"):
            raise SdkitError(f"--reg-data applies to lora, loha and lokr, not {config.method} "
                             "(dreambooth draws its own class pictures: --class-prompt)")
        if not data.reg_folder.is_dir():
            raise SdkitError(f"{data.reg_folder}: --reg-data must be a folder of N_class subfolders")
    if config.method in ("lora", "loha", "lokr") and config.dreambooth.prior_loss_weight is not None:
        if data.reg_folder is None and data.dataset_config is None:
            raise _ignored("--prior-loss-weight", "weights regularization pictures (--reg-data), and there are none")
        if config.dreambooth.prior_loss_weight < 0:
            raise SdkitError("--prior-loss-weight must be at least 0")


def _check_network(config: Any) -> None:
    network = config.network
    if network.conv_dim is not None and network.conv_dim < 1:
        raise SdkitError(f"--conv-dim must be at least 1, not {network.conv_dim}")
    if network.conv_alpha is not None:
        if network.conv_dim is None:
            raise _ignored("--conv-alpha", "scales the 3x3 convolution layers --conv-dim adds, and there is no "
                           "--conv-dim")
        if network.conv_alpha <= 0:
            raise SdkitError(f"--conv-alpha must be positive, not {network.conv_alpha:g}")
    if network.preset is not None:
        if config.method not in ("loha", "lokr"):
            raise SdkitError(f"--preset picks LyCORIS targets for loha and lokr, not {config.method} "
                             "(lora trains kohya's networks.lora set; add --conv-dim for convolutions)")
        if network.preset not in LYCORIS_PRESETS:
            raise SdkitError(f"--preset must be one of {', '.join(LYCORIS_PRESETS)}, not {network.preset!r}")
        if network.preset.startswith("unet-") and network.train_text_encoder:
            raise _ignored("--train-text-encoder", f"trains text-encoder layers, and --preset {network.preset} "
                           "has none")


def _check_optim(optim: Any) -> None:
    package = OPTIMIZER_PACKAGES.get(optim.optimizer)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        raise SdkitError(f"--optimizer {optim.optimizer} needs the {package[1]} package, which is not installed "
                         f"(pip install {package[1]}); or use --optimizer adamw")
    if optim.unet_lr is not None and optim.unet_lr <= 0:
        raise SdkitError("learning rates must be positive")
    if optim.optimizer == "adafactor":  # relative_step: Adafactor picks its own step sizes
        for option, given in (("--lr-scheduler", optim.lr_scheduler != "constant"),
                              ("--warmup-steps", optim.warmup_steps != 0),
                              ("--text-encoder-lr", optim.text_encoder_lr is not None),
                              ("--unet-lr", optim.unet_lr is not None)):
            if given:
                raise _ignored(option, "sets step sizes, and Adafactor picks its own (relative_step, "
                               "kohya's default)")


def _check_run(run: Any) -> None:
    if run.save_every_n_epochs < 0:
        raise SdkitError(f"--save-every-n-epochs must be at least 0, not {run.save_every_n_epochs}")
    if run.log_dir is not None and run.log_dir.exists() and not run.log_dir.is_dir():
        raise SdkitError(f"{run.log_dir}: --log-dir must be a folder")


def _check_epoch_files(config: Any) -> None:
    """Numbered files of an earlier run are not overwritten without --force."""
    if not config.run.save_every_n_epochs or config.run.overwrite:
        return
    output = config.output
    pattern = f"{output.stem}-[0-9][0-9][0-9][0-9][0-9][0-9]{output.suffix}"
    found = sorted(output.parent.glob(pattern)) if output.parent.is_dir() else []
    if found:
        raise SdkitError(f"{found[0]}: already exists, and --save-every-n-epochs writes files of this name "
                         "(overwriting needs --force)")
