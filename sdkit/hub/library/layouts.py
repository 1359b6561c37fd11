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

A folder without an index is taken for a WebUI root only on several folders at once: its
checkpoint folder (A1111/Forge `models/Stable-diffusion`; ComfyUI `models/checkpoints`
and `models/loras`) and more of the folders that WebUI ships or creates on its first run.
One folder of a common name (`vae/`, `lora/`, `models/`) makes nothing a library, and an
invokeai-like library is only ever one that `sdkit library init` made.
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
    required: tuple[str, ...] = ()     # a root of this WebUI has every one of these folders…
    companions: tuple[str, ...] = ()   # …and at least `min_companions` of these
    min_companions: int = 0
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

    def marks(self, root: Path) -> bool:
        """Whether `root` holds this WebUI's tree (never true for a layout without markers)."""
        if not self.required or not all((root / folder).is_dir() for folder in self.required):
            return False
        present = sum((root / folder).is_dir() for folder in self.companions)
        return present >= self.min_companions

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
    # a fresh clone ships models/Stable-diffusion, models/VAE-approx, models/karlo and
    # embeddings/; the first run adds models/VAE, models/Lora, models/hypernetworks, …
    required=("models/Stable-diffusion",),
    companions=("models/VAE", "models/VAE-approx", "models/Lora", "models/LyCORIS",
                "models/hypernetworks", "models/ESRGAN", "models/karlo", "embeddings"),
    min_companions=2,
)

COMFYUI = Layout(
    name="comfyui",
    folders={"checkpoint": "models/checkpoints", "unet": "models/diffusion_models",
             "text-encoder": "models/text_encoders", "vae": "models/vae", "lora": "models/loras",
             "embedding": "models/embeddings", "hypernetwork": "models/hypernetworks",
             "controlnet": "models/controlnet", "unknown": "models/other"},
    extra=("models/clip_vision", "models/configs", "models/diffusers", "models/style_models",
           "models/upscale_models", "models/vae_approx"),
    # ComfyUI ships a placeholder in every folder of folder_paths.py
    required=("models/checkpoints", "models/loras"),
    companions=("models/vae", "models/diffusion_models", "models/unet", "models/text_encoders",
                "models/clip", "models/clip_vision", "models/embeddings", "models/controlnet",
                "models/upscale_models", "models/vae_approx", "models/configs"),
    min_companions=1,
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
    """The WebUI whose root `root` is (A1111/Forge or ComfyUI), if exactly one fits."""
    if not root.is_dir():
        return None
    found = [layout for layout in (A1111, COMFYUI) if layout.marks(root)]
    return found[0] if len(found) == 1 else None
