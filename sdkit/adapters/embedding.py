"""Textual-inversion embeddings: every common file layout read into one `Embedding`.

Layouts (research: formats.md (c)):
- A1111 `.pt`: `{"string_to_param": {"*": (n, dim)}, "string_to_token", "name", "step",
  "sd_checkpoint_name", ...}`; the pickle reader flattens it to `string_to_param.*`
  (files pickled with a torch-1.11 `ParameterDict` flatten to
  `string_to_param._parameters.*`); exactly one entry, as A1111 requires;
- kohya / A1111 `emb_params` (`.safetensors` or `.pt`): `(n, dim)`;
- SDXL `clip_l` + `clip_g`: `(n, 768)` and `(n, 1280)`, the same n;
- diffusers `learned_embeds.bin|.safetensors`: `{token: (dim,) or (n, dim)}`.

Vectors are kept per text encoder, named as the diffusers component that takes them:
`text_encoder` (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL `clip_l`) and `text_encoder_2` (SDXL
`clip_g`), always 2-D `(n, dim)` in float32.

The default token is the one the file carries (the key of a diffusers file); otherwise
the file stem, which is the trigger word A1111, ComfyUI and kohya use (A1111 ignores the
stored `name` when loading; it is kept in `stored_name`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit.arch.embedding_detect import embedding_layout
from sdkit.errors import SdkitError
from sdkit.io import ModelFile, open_model

if TYPE_CHECKING:
    import torch

_A1111_PREFIXES = ("string_to_param._parameters.", "string_to_param.")
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}

# what a set of vector widths fits: (family, text encoder description)
_FITS: dict[tuple[tuple[str, int], ...], tuple[str, str]] = {
    (("text_encoder", 768),): ("sd1", "SD 1.x CLIP ViT-L/14"),
    (("text_encoder", 1024),): ("sd2", "SD 2.x OpenCLIP ViT-H/14"),
    (("text_encoder", 768), ("text_encoder_2", 1280)):
        ("sdxl-base", "SDXL CLIP ViT-L/14 + OpenCLIP ViT-bigG/14"),
    (("text_encoder", 1280),): ("unknown", "OpenCLIP ViT-bigG/14 alone (SDXL needs clip_l too)"),
}


@dataclass
class Embedding:
    """A textual-inversion embedding, whatever file it came from."""

    path: Path
    layout: str  # "a1111" | "kohya" | "kohya-sdxl" | "diffusers"
    token: str
    vectors: dict[str, "torch.Tensor"]  # text encoder component -> (n, dim) float32
    dtype: str  # dtype code the file stores the vectors in
    stored_name: str | None = None
    step: int | None = None
    checkpoint_name: str | None = None

    @property
    def vector_count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {component: int(rows.shape[1]) for component, rows in self.vectors.items()}

    @property
    def fits(self) -> tuple[str, str]:
        """(family, text encoder description) the vector widths belong to."""
        found = _FITS.get(tuple(sorted(self.widths.items())))
        if found is not None:
            return found
        widths = " + ".join(str(width) for width in self.widths.values())
        return "unknown", f"no released text encoder has width {widths}"

    def to_json(self) -> dict[str, Any]:
        family, encoder = self.fits
        return {
            "path": str(self.path), "layout": self.layout, "token": self.token,
            "tokens": vector_tokens(self.token, self.vector_count),
            "vectors": self.vector_count, "widths": self.widths, "family": family,
            "text_encoder": encoder, "dtype": self.dtype, "stored_name": self.stored_name,
            "step": self.step, "checkpoint_name": self.checkpoint_name,
        }


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens a multi-vector embedding takes in a tokenizer: `tok`, `tok_1`, ... as
    diffusers names them (its pipelines expand `tok` in prompts to all of them)."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def read_embedding(path: str | os.PathLike[str], token: str | None = None) -> Embedding:
    """Read a textual-inversion file; `token` overrides the file's own trigger word."""
    with open_model(path) as model:
        return embedding_from_model(model, token)


def embedding_from_model(model: ModelFile, token: str | None = None) -> Embedding:
    """The Embedding held by an opened file (SdkitError when it holds none)."""
    layout = embedding_layout(model)
    if layout is None:
        names = ", ".join(list(model.infos)[:4]) or "no tensors"
        raise SdkitError(f"{model.path}: not a textual-inversion embedding (tensors: {names})")
    sources = _vector_sources(model, layout)
    vectors = {component: _load_vectors(model, name) for component, name in sources.items()}
    _check_counts(model.path, vectors)
    return Embedding(
        path=model.path, layout=layout, token=_check_token(model.path, token or _file_token(model, layout)),
        vectors=vectors, dtype=model.info(next(iter(sources.values()))).dtype,
        stored_name=_text(model.extra.get("name")), step=_integer(model.extra.get("step")),
        checkpoint_name=_text(model.extra.get("sd_checkpoint_name")))


def _vector_sources(model: ModelFile, layout: str) -> dict[str, str]:
    """text encoder component -> tensor name in the file."""
    if layout == "kohya-sdxl":
        return {component: key for key, component in _SDXL_KEYS.items()}
    if layout == "a1111":
        entries = [name for name in model.infos if name.startswith(_A1111_PREFIXES)]
        if len(entries) != 1:
            raise SdkitError(f"{model.path}: string_to_param holds {len(entries)} entries; "
                             "an A1111 embedding has exactly one")
        return {"text_encoder": entries[0]}
    return {"text_encoder": next(iter(model.infos))}


def _load_vectors(model: ModelFile, name: str) -> "torch.Tensor":
    import torch

    info = model.info(name)  # embedding_layout saw float vectors, (dim,) or (n, dim)
    if 0 in info.shape:
        raise SdkitError(f"{model.path}: tensor {name!r} of shape {list(info.shape)} holds no vectors")
    vectors = model.load(name).detach().to(torch.float32).reshape(-1, info.shape[-1]).clone()
    if not torch.isfinite(vectors).all():
        raise SdkitError(f"{model.path}: tensor {name!r} contains NaN or Inf values")
    return vectors


def _check_counts(path: Path, vectors: dict[str, "torch.Tensor"]) -> None:
    counts = {component: rows.shape[0] for component, rows in vectors.items()}
    if len(set(counts.values())) > 1:
        raise SdkitError(f"{path}: clip_l and clip_g hold different numbers of vectors "
                         f"({counts['text_encoder']} and {counts['text_encoder_2']})")


def _file_token(model: ModelFile, layout: str) -> str:
    if layout == "diffusers":
        return next(iter(model.infos))
    return model.path.stem


def _check_token(path: Path, token: str) -> str:
    if not token or token != token.strip() or "\n" in token:
        raise SdkitError(f"{path}: {token!r} cannot be a token (empty, or edged by whitespace)")
    return token


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and str(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
