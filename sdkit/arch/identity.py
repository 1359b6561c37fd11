"""The answer of `identify()`: what a model file is, for people and for code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("checkpoint", "unet", "text-encoder", "vae", "lora", "embedding", "hypernetwork",
         "controlnet", "unknown")
PREDICTIONS = ("epsilon", "v", "unknown")
VARIANTS = ("normal", "inpaint", "pix2pix", "depth")


@dataclass
class Precision:
    """Dominant dtype code of the file, and of each component."""

    dominant: str | None = None
    components: dict[str, str] = field(default_factory=dict)


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
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (str keys, JSON types only) of every field."""
        return asdict(self)
