"""Which `sdkit train` options belong to which method: `sdkit train METHOD --help` lists
that method's options only, and an option given to a method it does not apply to is
refused in one line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from sdkit.errors import SdkitError

NETWORKS = ("lora", "loha", "lokr")
# option (click's parameter name) -> the methods it applies to; options not named apply to all
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "rank": NETWORKS, "alpha": NETWORKS, "dropout": NETWORKS, "conv_dim": NETWORKS, "conv_alpha": NETWORKS,
    "preset": ("loha", "lokr"), "reg_data": NETWORKS, "layout": NETWORKS,
    "timestep_sampling": NETWORKS, "flow_shift": NETWORKS,  # FLUX.1 (flow matching) trains networks only
    "vae": NETWORKS, "text_encoders": NETWORKS,  # a FLUX.1 diffusion model alone
    "train_text_encoder": (*NETWORKS, "dreambooth"), "text_encoder_lr": (*NETWORKS, "dreambooth"),
    "unet_lr": (*NETWORKS, "dreambooth"), "prior_loss_weight": (*NETWORKS, "dreambooth"),
    "token": ("ti",), "init_word": ("ti",), "vectors": ("ti",),
    "layer_structure": ("hypernet",), "activation": ("hypernet",), "layer_norm": ("hypernet",),
    "hypernet_dropout": ("hypernet",), "weight_init": ("hypernet",),
    "class_prompt": ("dreambooth",), "class_dir": ("dreambooth",), "num_class_images": ("dreambooth",),
    "output_format": ("dreambooth",),
    "save_precision": (*NETWORKS, "ti", "dreambooth"), "metadata_title": (*NETWORKS, "ti", "dreambooth"),
    "metadata_author": (*NETWORKS, "ti", "dreambooth"), "metadata_description": (*NETWORKS, "ti", "dreambooth"),
}
_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def applies(option: str, method: str) -> bool:
    return method in METHOD_OPTIONS.get(option, (method,))


class MethodCommand(click.Command):
    """A command whose first argument is a training method; its help lists only the options
    of the method named before `--help`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["train_method"] = self._method_in(args)
        return super().parse_args(ctx, args)

    def _method_in(self, args: list[str]) -> str | None:
        """The first positional word (option values skipped)."""
        takes_value = {name for param in self.params if isinstance(param, click.Option) and not param.is_flag
                       for name in param.opts}
        words = iter(args)
        for word in words:
            if word.startswith("-"):
                if word in takes_value:
                    next(words, None)
                continue
            return word
        return None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from sdkit.runtime.train.config import METHODS

        method = ctx.meta.get("train_method") if ctx.meta.get("train_method") in METHODS else None
        records = [param.get_help_record(ctx) for param in self.get_params(ctx) if isinstance(param, click.Option)
                   and (method is None or param.name is None or applies(param.name, method))]
        records = [record for record in records if record is not None]
        if records:
            title = f"Options for {method}" if method else "Options"
            with formatter.section(title):
                formatter.write_dl(records)


def refuse_foreign_options(ctx: click.Context, method: str) -> None:
    """An option given on the command line that `method` would not use: one line naming it."""
    for name, methods in METHOD_OPTIONS.items():
        if method not in methods and ctx.get_parameter_source(name) in _GIVEN:
            option = "--" + name.replace("_", "-")
            listed = ", ".join(methods[:-1]) + " and " + methods[-1] if len(methods) > 1 else methods[0]
            raise SdkitError(f"{_flag(ctx, name) or option} does not apply to {method} (it is for {listed}; "
                             f"`sdkit train {method} --help` lists {method}'s options)")


def _flag(ctx: click.Context, name: str) -> str | None:
    command = ctx.command
    return next((param.opts[0] for param in command.params if param.name == name), None)


def with_kohya_options(config: Any, options: dict[str, Any]) -> Any:
    """`config` with the options that follow kohya's sd-scripts (set apart from the option
    list's other groups)."""
    o = options
    dataset_config: Path | None = o["dataset_config"]
    folder = config.data.folder
    if dataset_config is not None and folder is not None:
        raise SdkitError("--data and --dataset-config both name the pictures; give one")
    if folder is None and dataset_config is None:
        raise SdkitError("give the pictures: --data FOLDER (or a kohya --dataset-config FILE)")
    data = replace(config.data, folder=folder or dataset_config.parent, dataset_config=dataset_config,
                   reg_folder=o["reg_data"], shuffle_caption=o["shuffle_caption"], keep_tokens=o["keep_tokens"],
                   flip_aug=o["flip_aug"])
    network = replace(config.network, conv_dim=o["conv_dim"], conv_alpha=o["conv_alpha"], preset=o["preset"])
    optim = replace(config.optim, unet_lr=o["unet_lr"])
    run = replace(config.run, save_every_n_epochs=o["save_every_n_epochs"], log_dir=o["log_dir"],
                  metadata_title=o["metadata_title"], metadata_author=o["metadata_author"],
                  metadata_description=o["metadata_description"])
    return replace(config, data=data, network=network, optim=optim, run=run)
