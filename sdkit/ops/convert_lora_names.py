"""Names of LoRA modules in kohya and diffusers / peft files, built from the base model.

kohya joins a module path with underscores: SD1 / SD2 UNets by their diffusers path
(`lora_unet_down_blocks_0_attentions_0_proj_in`), SDXL UNets by their LDM path
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`), text encoders by their HF
CLIP path (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`; SDXL `lora_te1_` /
`lora_te2_`). diffusers / peft prefix the component's module path with `unet.`,
`text_encoder.` or `text_encoder_2.`; text encoder paths come with or without
`text_model.` (transformers 5 flattened `CLIPTextModel`).

Underscores cannot be turned back into dots (`transformer_blocks`, `proj_in`, `to_out_0`
hold their own), so the index lists every weight-bearing module of the base model, read
from the key maps' links, under each of its names. The base model's configs come from a
local diffusers folder when given, else from the released family's block structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sdkit.arch.keymaps.clip import clip_links, has_projection
from sdkit.arch.keymaps.unet import unet_links
from sdkit.errors import SdkitError

KOHYA_TEXT_PREFIXES = {"sd1": {"text_encoder": "lora_te_"}, "sd2": {"text_encoder": "lora_te_"},
                       "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                       "sdxl_refiner": {"text_encoder_2": "lora_te2_"}}
_WRAP = "text_model."
# the released families' structure: what the key maps read from a config
_SDXL_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
              "addition_embed_type": "text_time"}
_REFINER_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "block_out_channels": [384, 768, 1536, 1536], "transformer_layers_per_block": 4,
                 "addition_embed_type": "text_time"}
_CLIP_L = {"num_hidden_layers": 12, "architectures": ["CLIPTextModel"]}
_BIG_G = {"num_hidden_layers": 32, "architectures": ["CLIPTextModelWithProjection"]}
REFERENCE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"unet": {}, "text_encoder": _CLIP_L},  # UNet2DConditionModel's defaults are SD1's
    "sd2": {"unet": {}, "text_encoder": {"num_hidden_layers": 23, "architectures": ["CLIPTextModel"]}},
    "sdxl": {"unet": _SDXL_UNET, "text_encoder": _CLIP_L, "text_encoder_2": _BIG_G},
    "sdxl_refiner": {"unet": _REFINER_UNET, "text_encoder_2": _BIG_G},
}


@dataclass(frozen=True)
class LoraTarget:
    """One weight-bearing module of the base model, under each convention's name."""

    component: str  # unet | text_encoder | text_encoder_2
    diffusers: str  # module path in the diffusers / transformers model
    kohya: str  # the name kohya's trainer gives it (prefix included)

    @property
    def peft(self) -> str:
        return f"{self.component}.{self.diffusers}"


def _module_path(keys: tuple[str, ...]) -> str | None:
    """The module path of a link's single `.weight` tensor (None for other links)."""
    return keys[0][: -len(".weight")] if len(keys) == 1 and keys[0].endswith(".weight") else None


class LoraNameIndex:
    """Every module of a base model by kohya name and by diffusers / peft name.

    `layout` is a key of `sdkit.arch.keymaps.LAYOUTS`; `configs` the components' diffusers
    configs (missing ones come from the released family).
    """

    def __init__(self, layout: str, configs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        if layout not in REFERENCE_CONFIGS:
            raise SdkitError(f"LoRA names: no module index for layout {layout!r}")
        self.layout = layout
        self.configs = {**REFERENCE_CONFIGS[layout], **{k: dict(v) for k, v in (configs or {}).items()
                                                        if k in REFERENCE_CONFIGS[layout]}}
        self.by_kohya: dict[str, LoraTarget] = {}
        self.by_peft: dict[str, LoraTarget] = {}
        self._index_unet()
        for component, prefix in KOHYA_TEXT_PREFIXES[layout].items():
            self._index_text_encoder(component, prefix)

    def _add(self, target: LoraTarget, kohya_aliases: tuple[str, ...], peft_aliases: tuple[str, ...]) -> None:
        for name in (target.kohya, *kohya_aliases):
            self.by_kohya.setdefault(name, target)
        for name in (target.peft, *peft_aliases):
            self.by_peft.setdefault(name, target)

    def _index_unet(self) -> None:
        # kohya names SD1 / SD2 UNet modules by their diffusers path, SDXL ones by the LDM path
        by_ldm = self.layout.startswith("sdxl")
        for link in unet_links(self.configs["unet"]):
            diffusers, ldm = _module_path(link.diffusers), _module_path(link.ldm)
            if diffusers is None or ldm is None:
                continue
            names = ("lora_unet_" + ldm.replace(".", "_"), "lora_unet_" + diffusers.replace(".", "_"))
            kohya, alias = names if by_ldm else names[::-1]
            self._add(LoraTarget("unet", diffusers, kohya), (alias,), ())

    def _index_text_encoder(self, component: str, prefix: str) -> None:
        config = self.configs[component]
        for link in clip_links(config, "hf", has_projection(config)):
            diffusers, hf = _module_path(link.diffusers), _module_path(link.ldm)
            if diffusers is None or hf is None:
                continue
            # the model's own spelling first; files made for the other transformers layout load too
            flat = diffusers.removeprefix(_WRAP)
            other = flat if diffusers.startswith(_WRAP) else _WRAP + flat
            target = LoraTarget(component, diffusers, prefix + hf.replace(".", "_"))
            self._add(target, (), (f"{component}.{other}",))

    def resolve(self, name: str) -> LoraTarget | None:
        """The module a LoRA module name (either convention) stands for."""
        return self.by_kohya.get(name) or self.by_peft.get(name)
