"""Where each kind of model file lives in the folder layouts the WebUIs read.

- `a1111` (AUTOMATIC1111 / Forge, rooted at the WebUI folder): checkpoints and UNets in
  `models/Stable-diffusion`, `models/VAE`, `models/Lora` (LyCORIS too), `embeddings/`
  (not under models/), `models/hypernetworks`, `models/ControlNet`, Forge's
  `models/text_encoder`; init also creates the upscaler folders.
- `comfyui` (rooted at the ComfyUI folder): `models/checkpoints`, `models/diffusion_models`,
  `models/text_encoders`, `models/vae`, `models/loras`, `models/embeddings`,
  `models/hypernetworks`, `models/controlnet`, plus the other folders ComfyUI scans.
- `invokeai-like`: flat, one folder per family then per type, as InvokeAI 3 kept them:
  `<family>/<type>/file` with types main, unet, text_encoder, vae, lora, embedding,
  hypernetwork, controlnet, other, and family `any` when the family is unknown.
Files sdkit cannot classify go to `models/other` (`<family>/other` in invokeai-like), a
folder of sdkit's own that the WebUIs ignore. With family subfolders, a1111 and comfyui files go
one level deeper by family (`models/Lora/sdxl/x.safetensors`); the WebUIs list subfolders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FAMILY_FOLDERS = {"sdxl-base": "sdxl"}  # every other family keeps its own name
UNKNOWN_FAMILY_FOLDER = "any"


@dataclass(frozen=True)
class Layout:
    name: str
    folders: dict[str, str]            # kind -> folder relative to the library root
    extra: tuple[str, ...] = ()        # more folders the WebUI expects, created by init
    markers: tuple[str, ...] = ()      # folders whose presence gives the layout away
    family_first: bool = False         # `<family>/<kind>` instead of `<kind>/<family>`

    def folder_for(self, kind: str, family: str, family_subfolders: bool) -> str:
        """The folder (relative, POSIX) a file of this kind and family belongs in."""
        folder = self.folders.get(kind, self.folders["unknown"])
        family_folder = family_folder_name(family)
        if self.family_first:
            return f"{family_folder or UNKNOWN_FAMILY_FOLDER}/{folder}"
        if family_subfolders and family_folder and kind != "unknown":
            return f"{folder}/{family_folder}"
        return folder

    def all_folders(self) -> list[str]:
        if self.family_first:
            return []  # created on demand: families are open-ended
        return sorted(set(self.folders.values()) | set(self.extra))


def family_folder_name(family: str) -> str | None:
    if not family or family == "unknown":
        return None
    return FAMILY_FOLDERS.get(family, family)


A1111 = Layout(
    name="a1111",
    folders={"checkpoint": "models/Stable-diffusion", "unet": "models/Stable-diffusion",
             "text-encoder": "models/text_encoder", "vae": "models/VAE", "lora": "models/Lora",
             "embedding": "embeddings", "hypernetwork": "models/hypernetworks",
             "controlnet": "models/ControlNet", "unknown": "models/other"},
    extra=("models/ESRGAN", "models/RealESRGAN", "models/GFPGAN", "models/Codeformer",
           "models/SwinIR"),
    markers=("models/Stable-diffusion", "models/Lora"),
)

COMFYUI = Layout(
    name="comfyui",
    folders={"checkpoint": "models/checkpoints", "unet": "models/diffusion_models",
             "text-encoder": "models/text_encoders", "vae": "models/vae", "lora": "models/loras",
             "embedding": "models/embeddings", "hypernetwork": "models/hypernetworks",
             "controlnet": "models/controlnet", "unknown": "models/other"},
    extra=("models/clip_vision", "models/configs", "models/diffusers", "models/style_models",
           "models/upscale_models", "models/vae_approx"),
    markers=("models/checkpoints", "models/loras", "models/diffusion_models"),
)

INVOKEAI_LIKE = Layout(
    name="invokeai-like",
    folders={"checkpoint": "main", "unet": "unet", "text-encoder": "text_encoder", "vae": "vae",
             "lora": "lora", "embedding": "embedding", "hypernetwork": "hypernetwork",
             "controlnet": "controlnet", "unknown": "other"},
    family_first=True,
)

LAYOUTS = {layout.name: layout for layout in (A1111, COMFYUI, INVOKEAI_LIKE)}


def detect_layout(root: Path) -> Layout | None:
    """The layout an existing folder tree follows, if it follows one."""
    for layout in (A1111, COMFYUI):
        if any((root / marker).is_dir() for marker in layout.markers):
            return layout
    type_folders = set(INVOKEAI_LIKE.folders.values())
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and any(
                    (child / name).is_dir() for name in type_folders):
                return INVOKEAI_LIKE
    return None
