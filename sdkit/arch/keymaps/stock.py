"""The released models' configs, and what a config read off the weights cannot say.

A diffusers config derived from LDM weights (`infer.py`) holds every size the tensors
fix: channels, layers, transformer depths, attention placement, context and text widths.
Some settings leave no trace in any tensor shape, so the derived config can only guess
them (`UNDETERMINED`): a UNet's attention heads (the q/k/v weights are [C, C] however
they are split), the GroupNorm group count (its weight is [C]), the default sample size,
a VAE's latent scaling factor, a text encoder's heads and activation.

When a component has the sizes of the family's released model (`STOCK`: SD 1.5, SD 2.1,
SDXL base 1.0 and refiner 1.0, as their diffusers repositories configure them) those
settings are the released ones. Otherwise nothing in the file says them: a config that is
written for a client to load must come from the model's own diffusers folder, and
`complete_configs` refuses with the names of the missing settings and the size that is
not the stock one. Only sizes that bear on those settings are compared, so inpainting
UNets (9 input channels) and text encoders with added tokens still count as stock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sdkit.errors import SdkitError


@dataclass(frozen=True)
class StockPart:
    """One component of a released model."""

    sizes: Mapping[str, Any]  # config values the weights determine, as the released model has them
    settings: Mapping[str, Any] = field(default_factory=dict)  # values they do not determine


# settings the weights cannot tell, by component kind; a refusal names them
UNDETERMINED: dict[str, tuple[str, ...]] = {
    "unet": ("attention_head_dim", "norm_num_groups", "sample_size"),
    "vae": ("norm_num_groups", "scaling_factor", "sample_size"),
    "text_encoder": ("num_attention_heads", "hidden_act"),
}
# values a derived config carries by convention although no tensor says them, and that
# no released model sets otherwise (the transformers / diffusers defaults)
_CONVENTIONS: dict[str, tuple[str, ...]] = {
    "unet": (), "vae": (), "text_encoder": ("layer_norm_eps",),
}
FAMILY_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner"}

_SD_LEVELS = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
_SD_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "transformer_layers_per_block": 1, **_SD_LEVELS}
_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}
_CLIP_L = StockPart({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12},
                    {"num_attention_heads": 12, "hidden_act": "quick_gelu"})
_CLIP_BIG_G = StockPart({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                         "projection_dim": 1280},
                        {"num_attention_heads": 20, "hidden_act": "gelu"})
_XL_SETTINGS = {"norm_num_groups": 32, "sample_size": 128}
_XL_VAE = StockPart(_SD_VAE, {"norm_num_groups": 32, "scaling_factor": 0.13025, "sample_size": 1024})

STOCK: dict[str, dict[str, StockPart]] = {
    "sd1": {
        "unet": StockPart({**_SD_UNET, "cross_attention_dim": 768, "use_linear_projection": False},
                          {"attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 64}),
        "vae": StockPart(_SD_VAE, {"norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512}),
        "text_encoder": _CLIP_L,
    },
    "sd2": {  # SD 2.1 (768 px, the shapes of 2.1-base too: diffusers' single-file loader picks 2.1 as well)
        "unet": StockPart({**_SD_UNET, "cross_attention_dim": 1024, "use_linear_projection": True},
                          {"attention_head_dim": [5, 10, 20, 20], "norm_num_groups": 32, "sample_size": 96}),
        "vae": StockPart(_SD_VAE, {"norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": 512}),
        # OpenCLIP ViT-H without its last layer (SD 2 reads the penultimate one)
        "text_encoder": StockPart({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23},
                                  {"num_attention_heads": 16, "hidden_act": "gelu"}),
    },
    "sdxl": {
        "unet": StockPart({"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                           "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                           "use_linear_projection": True,
                           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
                          {"attention_head_dim": [5, 10, 20], **_XL_SETTINGS}),
        "vae": _XL_VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _CLIP_BIG_G,
    },
    "sdxl_refiner": {
        "unet": StockPart({"block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2,
                           "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
                           "use_linear_projection": True,
                           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                "DownBlock2D"],
                           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                              "UpBlock2D"]},
                          {"attention_head_dim": [6, 12, 24, 24], **_XL_SETTINGS}),
        "vae": _XL_VAE,
        "text_encoder_2": _CLIP_BIG_G,
    },
}


def component_kind(component: str) -> str:
    """"unet", "vae" or "text_encoder" (both text encoders)."""
    return "text_encoder" if component.startswith("text_encoder") else component


def determined_settings(component: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a derived config that the weights themselves determine."""
    kind = component_kind(component)
    left_out = set(UNDETERMINED[kind]) | set(_CONVENTIONS[kind])
    if kind == "text_encoder" and "CLIPTextModelWithProjection" not in (config.get("architectures") or ()):
        left_out.add("projection_dim")  # a model without the projection has no trace of its width
    return {name: value for name, value in config.items() if name not in left_out}


def _same(value: Any, stock: Any) -> bool:
    """Config values equal, a per-level list whose entries are all one value equal to that value."""
    if isinstance(value, (list, tuple)) and not isinstance(stock, (list, tuple)):
        return all(_same(entry, stock) for entry in value)
    if isinstance(stock, (list, tuple)) and not isinstance(value, (list, tuple)):
        return all(_same(value, entry) for entry in stock)
    if isinstance(value, (list, tuple)):
        return len(value) == len(stock) and all(_same(a, b) for a, b in zip(value, stock))
    return value == stock


def stock_difference(layout: str, component: str, config: Mapping[str, Any]) -> str | None:
    """The first size in which `config` is not the stock model's, in words; None when stock."""
    stock = STOCK.get(layout, {}).get(component)
    title = FAMILY_TITLES.get(layout, layout)
    if stock is None:
        return f"the released {title} model has no {component}"
    for name, value in stock.sizes.items():
        if not _same(config.get(name), value):
            return f"{name} {_shown(config.get(name))}, stock {title} {_shown(value)}"
    return None


def _shown(value: Any) -> str:
    return "none" if value is None else str(list(value) if isinstance(value, tuple) else value)


def _unsaid(component: str, difference: str) -> str:
    return f"{component} {', '.join(UNDETERMINED[component_kind(component)])} ({difference})"


def complete_configs(layout: str, derived: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Derived configs with the settings the weights do not tell, taken from the released
    model's config; SdkitError naming them for every component that is not of stock size."""
    completed: dict[str, dict] = {}
    unsaid: list[str] = []
    for component, config in derived.items():
        difference = stock_difference(layout, component, config)
        if difference is None:
            completed[component] = {**config, **STOCK[layout][component].settings}
        else:
            unsaid.append(_unsaid(component, difference))
    if unsaid:
        raise SdkitError(f"the weights do not say {'; '.join(unsaid)}, and these sizes are not the released "
                         "model's; give the model's own diffusers folder with --config DIR")
    return completed


def needs_config_message(layout: str, configs: Mapping[str, Mapping[str, Any]],
                         components: Iterable[str]) -> str | None:
    """Why configs derived for `components` may not build the model; None when all are stock."""
    for component in components:
        difference = stock_difference(layout, component, configs[component]) if component in configs else None
        if difference is not None:
            return (f"the weights do not say {_unsaid(component, difference)}; give the model's "
                    "diffusers folder with --config DIR")
    return None
