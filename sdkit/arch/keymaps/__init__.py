"""Exact maps between the LDM single-file (A1111) and diffusers key layouts.

Every map is derived from the diffusers config of the component (levels, layers per
block, transformer depth, attention placement, embeddings, text encoder depth), so toy
models and SD1.5 / SD2 / SDXL go through the same code. Plans are lazy (`KeyPlan`:
output key -> `KeyRecipe`) and the two directions are exact inverses: what the other
layout can hold comes back bit for bit.
"""

from sdkit.arch.keymaps.checkpoint import (
    COMPONENT_KINDS,
    LAYOUTS,
    CheckpointPlan,
    Part,
    checkpoint_from_ldm,
    checkpoint_to_ldm,
    diffusers_layout,
    ldm_layout,
    plan_for,
)
from sdkit.arch.keymaps.clip import clip_plan, has_projection, stored_clip_names
from sdkit.arch.keymaps.infer import (
    infer_clip_config_from_ldm,
    infer_unet_config_from_ldm,
    infer_vae_config_from_ldm,
)
from sdkit.arch.keymaps.recipe import DIRECTIONS, KeyPlan, KeyRecipe, convert_state_dict, dropped_keys
from sdkit.arch.keymaps.unet import unet_plan
from sdkit.arch.keymaps.vae import vae_plan

__all__ = [
    "COMPONENT_KINDS", "DIRECTIONS", "LAYOUTS", "CheckpointPlan", "KeyPlan", "KeyRecipe", "Part",
    "checkpoint_from_ldm", "checkpoint_to_ldm", "clip_plan", "convert_state_dict", "diffusers_layout",
    "dropped_keys", "has_projection", "infer_clip_config_from_ldm", "infer_unet_config_from_ldm",
    "infer_vae_config_from_ldm", "ldm_layout", "plan_for", "stored_clip_names", "unet_plan", "vae_plan",
]
