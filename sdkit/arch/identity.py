"""The answer of `identify()`: what a model file is, for people and for code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sdkit.errors import SdkitError

KINDS = ("checkpoint", "unet", "text-encoder", "vae", "lora", "embedding", "hypernetwork",
         "controlnet", "image-encoder", "upscaler", "unknown")
PREDICTIONS = ("epsilon", "v", "unknown")
VARIANTS = ("normal", "inpaint", "pix2pix", "depth")


@dataclass
class Precision:
    """Dominant dtype code of the file, and of each component; in words (`label`: "bf16",
    "fp8 e4m3fn scaled", "mixed: 180 nvfp4 layers, rest bf16") and, for quantized files,
    how (`quantization`: scheme, formats by layer count, markers)."""

    dominant: str | None = None
    components: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    quantization: dict[str, Any] | None = None


@dataclass
class Identity:
    """What a model file is.

    - `kind`: one of KINDS. Flux / SD3 transformers count as "unet" (the denoiser).
    - `family`: a key of `sdkit.arch.families.FAMILIES`, or "unknown"; for adapters, the
      family they were made for.
    - `variant` / `prediction`: for denoisers; `prediction_evidence` says what decided it.
    - `adapter_type`: LoRA-family files only (lora, locon, loha, lokr, ia3, dylora, full,
      dora, glora, oft, boft, norm).
    - `key_convention`: ldm | diffusers | kohya | peft | lycoris | a1111 | unknown.
    - `components`: diffusers component names the file holds (for adapters: touches).
    - `nonstandard`: dimensions differ from the released family (e.g. a tiny test model).
    - `part`: what the file is, in words ("FLUX.1-dev diffusion model", "T5-XXL encoder");
      `needs`: the parts it runs with that it does not hold ("CLIP-L", "FLUX VAE");
      `summary`: one line of both with the precision.
    - `refusal`: why the file cannot be used as one model (it mixes families), else None.
    - `notes`: sentences for people; `facts`: JSON-serialisable details for code.
    """

    kind: str
    family: str = "unknown"
    variant: str = "normal"
    prediction: str = "unknown"
    prediction_evidence: str | None = None
    adapter_type: str | None = None
    key_convention: str = "unknown"
    components: list[str] = field(default_factory=list)
    precision: Precision = field(default_factory=Precision)
    nonstandard: bool = False
    part: str = ""
    needs: list[str] = field(default_factory=list)
    summary: str = ""
    refusal: str | None = None
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (str keys, JSON types only) of every field."""
        return asdict(self)


def refuse_unusable(identity: Identity, path: object) -> None:
    """Raise the one-line refusal of a file that is not one model (SdkitError)."""
    if identity.refusal:
        raise SdkitError(f"{path}: {identity.refusal}")
