"""Where each kind of model file lives in the folder layouts the WebUIs read.

- `a1111` (AUTOMATIC1111 / Forge, rooted at the WebUI folder): checkpoints and split
  diffusion models alike in `models/Stable-diffusion` (Forge loads a FLUX or other
  transformer file from there), `models/VAE`, `models/Lora` (`models/LyCORIS` is still
  read), `embeddings/` (not under models/), `models/hypernetworks`, `models/ControlNet`,
  and Forge's `models/text_encoder` (its `modules_forge/main_entry.py` lists VAE and
  text_encoder as the module folders); init also creates the upscaler folders.
- `comfyui` (rooted at the ComfyUI folder, names from its `folder_paths.py`):
  `models/checkpoints`, split diffusion models (UNet or transformer) in
  `models/diffusion_models` (the legacy `models/unet` is still read), text encoders in
  `models/text_encoders` (legacy `models/clip`), `models/vae`, `models/loras`,
  `models/embeddings`, `models/hypernetworks`, `models/controlnet` (legacy
  `models/t2i_adapter`), plus the other folders ComfyUI scans (`upscale_models`,
  `clip_vision`, …).
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

from dataclasses import dataclass, field
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
    legacy: dict[str, tuple[str, ...]] = field(default_factory=dict)  # older names still read
    # kinds the WebUI also loads from another kind's folder (ComfyUI's diffusion model
    # loader takes the denoiser out of a whole checkpoint)
    also_read: dict[str, tuple[str, ...]] = field(default_factory=dict)

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

    def folders_of_kind(self, kind: str) -> tuple[str, ...]:
        """Every folder the WebUI reads files of this kind from: the current name first."""
        if kind == "unknown" or kind not in self.folders:
            return ()
        return (self.folders[kind], *self.legacy.get(kind, ()))

    def kinds_read_from(self, relative_path: str) -> set[str]:
        """The kinds the WebUI reads from the folder holding `relative_path` (subfolders
        included); empty for a path in no model folder of this layout."""
        if self.family_first:
            return set()
        kinds = set()
        for kind in self.folders:
            if any(relative_path.startswith(folder + "/") for folder in self.folders_of_kind(kind)):
                kinds |= {kind, *self.also_read.get(kind, ())}
        return kinds

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
    # Forge reads split diffusion models (FLUX, …) from the checkpoint folder
    folders={"checkpoint": "models/Stable-diffusion", "unet": "models/Stable-diffusion",
             "text-encoder": "models/text_encoder", "vae": "models/VAE", "lora": "models/Lora",
             "embedding": "embeddings", "hypernetwork": "models/hypernetworks",
             "controlnet": "models/ControlNet", "upscaler": "models/ESRGAN",
             "image-encoder": "models/clip_vision", "unknown": "models/other"},
    extra=("models/ESRGAN", "models/RealESRGAN", "models/GFPGAN", "models/Codeformer",
           "models/SwinIR"),
    # a fresh clone ships models/Stable-diffusion, models/VAE-approx, models/karlo and
    # embeddings/; the first run adds models/VAE, models/Lora, models/hypernetworks, …
    required=("models/Stable-diffusion",),
    companions=("models/VAE", "models/VAE-approx", "models/Lora", "models/LyCORIS",
                "models/hypernetworks", "models/ESRGAN", "models/karlo", "embeddings",
                "models/text_encoder"),  # Forge ships models/text_encoder
    min_companions=2,
    legacy={"lora": ("models/LyCORIS",)},
)

COMFYUI = Layout(
    name="comfyui",
    folders={"checkpoint": "models/checkpoints", "unet": "models/diffusion_models",
             "text-encoder": "models/text_encoders", "vae": "models/vae", "lora": "models/loras",
             "embedding": "models/embeddings", "hypernetwork": "models/hypernetworks",
             "controlnet": "models/controlnet", "upscaler": "models/upscale_models",
             "image-encoder": "models/clip_vision", "unknown": "models/other"},
    extra=("models/clip_vision", "models/configs", "models/diffusers", "models/gligen",
           "models/photomaker", "models/style_models", "models/upscale_models",
           "models/vae_approx"),
    # ComfyUI ships a placeholder in every folder of folder_paths.py
    required=("models/checkpoints", "models/loras"),
    companions=("models/vae", "models/diffusion_models", "models/unet", "models/text_encoders",
                "models/clip", "models/clip_vision", "models/embeddings", "models/controlnet",
                "models/upscale_models", "models/vae_approx", "models/configs"),
    min_companions=1,
    legacy={"unet": ("models/unet",), "text-encoder": ("models/clip",),
            "controlnet": ("models/t2i_adapter",)},
    also_read={"unet": ("checkpoint",)},
)

INVOKEAI_LIKE = Layout(
    name="invokeai-like",
    folders={"checkpoint": "main", "unet": "unet", "text-encoder": "text_encoder", "vae": "vae",
             "lora": "lora", "embedding": "embedding", "hypernetwork": "hypernetwork",
             "controlnet": "controlnet", "upscaler": "upscaler", "image-encoder": "clip_vision",
             "unknown": "other"},
    family_first=True,
)

LAYOUTS = {layout.name: layout for layout in (A1111, COMFYUI, INVOKEAI_LIKE)}


def detect_layout(root: Path) -> Layout | None:
    """The WebUI whose root `root` is (A1111/Forge or ComfyUI), if exactly one fits."""
    if not root.is_dir():
        return None
    found = [layout for layout in (A1111, COMFYUI) if layout.marks(root)]
    return found[0] if len(found) == 1 else None
