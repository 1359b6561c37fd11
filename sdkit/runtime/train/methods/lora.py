"""LoRA, LoHa and LoKr: peft adapters on kohya's layers, saved as kohya files.

Targets are those of kohya's `networks.lora` (see `targets.py`): every Linear and 1x1
conv of the UNet's transformer blocks (attention, proj_in / proj_out, feed-forward) and,
with `--train-text-encoder`, of every text encoder's attention and MLP; `--conv-dim` adds
the ResNet blocks and samplers, their 3x3 convolutions at the conv rank (LoCon), and
`--preset` picks a LyCORIS preset for LoHa / LoKr. peft injects the layers (`LoraConfig`,
`LoHaConfig`, `LoKrConfig`), initialised as kohya initialises them (down / first factors
random, up / second factors zero, so training starts from the base model). `--dropout`
is peft's `lora_dropout` for LoRA and `rank_dropout` for LoHa / LoKr.

The file is written by `sdkit.adapters.lora_export` in kohya format (`lora_unet_`,
`lora_te_` or SDXL `lora_te1_` / `lora_te2_` names, the configured alpha stored as
`.alpha`), with sd-scripts' `ss_*` training metadata and ModelSpec; `--layout diffusers`
writes a LoRA in diffusers / peft names instead.

On FLUX.1 (`flux_lora.py`) the targets are the layers kohya's `networks/lora_flux.py`
trains by default, every linear layer of the double- and single-stream blocks, reached by
their diffusers names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdkit.adapters.lora_export import LoraFacts, Provenance, write_lora
from sdkit.runtime.train.methods.base import SaveContext, TrainingMethod, trainable
from sdkit.runtime.train.methods.flux_lora import FLUX_TARGETS, flux_network_metadata, write_flux_adapter
from sdkit.runtime.train.methods.lyco import export_modules
from sdkit.runtime.train.methods.targets import DEFAULT_CONV_ALPHA, layer_targets, preset_of

_NETWORK_MODULES = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}


class NetworkMethod(TrainingMethod):
    """`lora`, `loha` or `lokr` (the method name picks the peft config)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = self.config.method
        self.text_grad = self.config.network.train_text_encoder
        self._ldm_paths: dict[str, str] = {}
        self._conv_layers: dict[str, set[str]] = {}

    @property
    def alpha(self) -> float:
        options = self.config.network
        return float(options.alpha if options.alpha is not None else options.rank)

    @property
    def conv_alpha(self) -> float:
        options = self.config.network
        return float(options.conv_alpha if options.conv_alpha is not None else DEFAULT_CONV_ALPHA)

    def _peft_config(self, targets: list[str] | str, convs: list[str] = ()) -> Any:
        """peft's config for `targets` (layer names, or one regex: FLUX's) at the network rank
        and `convs` at the conv rank."""
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        options = self.config.network
        ranks = {name: options.conv_dim for name in convs}
        alphas = {name: self.conv_alpha for name in convs}
        modules = targets if isinstance(targets, str) else [*targets, *convs]
        if self.name == "lora":
            return LoraConfig(r=options.rank, lora_alpha=self.alpha, lora_dropout=options.dropout,
                              target_modules=modules, rank_pattern=ranks, alpha_pattern=alphas)
        config_class = LoHaConfig if self.name == "loha" else LoKrConfig
        return config_class(r=options.rank, alpha=self.alpha, rank_dropout=options.dropout,
                            target_modules=modules, rank_pattern=ranks, alpha_pattern=alphas)

    def _targets(self, name: str, module: torch.nn.Module) -> tuple[list[str], list[str]]:
        options = self.config.network
        preset = preset_of(self.name, options.preset, options.conv_dim)
        linear, convs = layer_targets(module, name, preset, options.conv_dim is not None)
        self._conv_layers[name] = set(convs)
        return linear, convs

    def components(self) -> dict[str, torch.nn.Module]:
        if self.model.is_flow:
            return {"transformer": self.pipe.transformer}
        found = {"unet": self.pipe.unet}
        if self.config.network.train_text_encoder:
            found.update({name: getattr(self.pipe, name) for name in self.model.text_components})
        return found

    def setup(self, generator: torch.Generator) -> None:
        from peft import inject_adapter_in_model

        if self.model.family == "sdxl-base":  # kohya names SDXL UNet layers after LDM paths
            self._ldm_paths = unet_ldm_paths(self.model)
        for name, module in self.components().items():
            targets = (FLUX_TARGETS, []) if name == "transformer" else self._targets(name, module)
            inject_adapter_in_model(self._peft_config(*targets), module, adapter_name="default")

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = []
        optim = self.config.optim
        for name, module in self.components().items():
            lr = optim.lr if name in ("unet", "transformer") else (optim.text_encoder_lr or optim.lr)
            groups.append({"params": trainable(module), "lr": lr})
        return groups

    def network_metadata(self) -> dict[str, str]:
        options = self.config.network
        args: dict[str, Any] = {}
        if self.name != "lora":
            args = {"algo": self.name, "dropout": 0.0, "rank_dropout": options.dropout}
        if options.preset is not None:
            args["preset"] = options.preset
            if self.name == "lokr":
                args["factor"] = -1
        if options.conv_dim is not None:  # kohya records network_args as strings
            args.update(conv_dim=str(options.conv_dim), conv_alpha=str(self.conv_alpha))
        metadata = {"ss_network_module": _NETWORK_MODULES[self.name], "ss_network_dim": str(options.rank),
                    "ss_network_alpha": str(self.alpha), "ss_network_dropout": str(options.dropout),
                    "ss_network_train_unet_only": str(not options.train_text_encoder)}
        if self.model.is_flow:
            args = {**args, **flux_network_metadata(self.name)}
        if args:
            metadata["ss_network_args"] = json.dumps(args)
        return metadata

    def save(self, context: SaveContext) -> list[Path]:
        from peft.utils import get_peft_model_state_dict

        if self.model.is_flow:
            state = get_peft_model_state_dict(self.pipe.transformer, adapter_name="default")
            return [write_flux_adapter(self, state, context)]
        modules = []
        for name, module in self.components().items():
            state = get_peft_model_state_dict(module, adapter_name="default")
            paths = self._ldm_paths if name == "unet" else None
            conv = {path: (self.config.network.conv_dim, self.conv_alpha) for path in self._conv_layers.get(name, ())}
            modules += export_modules(state, name, self.config.network.rank, self.alpha, paths, conv)
        facts = LoraFacts(family=self.model.family, prediction=context.prediction,
                          network_module=_NETWORK_MODULES[self.name],
                          notes={**context.training_metadata, **self.network_metadata()})
        provenance = Provenance("train", tuple(context.inputs), context.recipe_params, context.input_hashes)
        return [write_lora(context.path, modules, facts, provenance, format=self.config.network.layout,
                           dtype=context.dtype, overwrite=context.overwrite)]


def unet_ldm_paths(model: Any) -> dict[str, str]:
    """diffusers module path -> LDM module path of every UNet layer of a loaded model."""
    from sdkit.adapters.lora_names import model_names
    from sdkit.runtime.sample.lora import pipeline_tensors

    unet = model.pipe.unet
    names = model_names("diffusers", model.layout, pipeline_tensors(model.pipe, ["unet"]),
                        {"unet": dict(unet.config)})
    return {t.diffusers_path: t.ldm_path for t in names.targets
            if t.component == "unet" and t.diffusers_path and t.ldm_path}
