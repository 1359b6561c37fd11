"""Recognise textual-inversion embeddings (formats.md (c)).

- A1111 `.pt`: `string_to_param.<token>` (pickle readers flatten the dict), with
  `string_to_token`, `name`, `step`, `sd_checkpoint_name` among the extras;
- kohya: `emb_params`; SDXL: `clip_l` + `clip_g`;
- diffusers `learned_embeds`: one tensor named by its token.
The family follows the vector width (InvokeAI): 768 SD1, 1024 SD2, CLIP-L + bigG SDXL.
"""

from __future__ import annotations

from sdkit.arch.families import FAMILIES, FAMILY_BY_EMBEDDING_WIDTH
from sdkit.arch.hygiene import precision_of
from sdkit.arch.identity import Identity
from sdkit.arch.metadata import MetadataHints
from sdkit.io.model_file import FLOAT_DTYPES, ModelFile

_A1111_PREFIX = "string_to_param."
_CONVENTIONS = {"a1111": "a1111", "kohya": "kohya", "kohya-sdxl": "kohya", "diffusers": "diffusers"}
_MAX_VECTORS = 1024  # a lone tensor with more rows than this is a weight, not an embedding


def embedding_layout(model: ModelFile) -> str | None:
    """"a1111" | "kohya" | "kohya-sdxl" | "diffusers", or None when not an embedding."""
    layout = _layout_by_names(list(model.infos))
    if layout is None:
        return None
    vectors = [n for n in model.infos if layout != "a1111" or n.startswith(_A1111_PREFIX)]
    return layout if all(_looks_like_vectors(model, name) for name in vectors) else None


def _layout_by_names(names: list[str]) -> str | None:
    if any(name.startswith(_A1111_PREFIX) for name in names):
        return "a1111"
    if names == ["emb_params"]:
        return "kohya"
    if set(names) == {"clip_l", "clip_g"}:
        return "kohya-sdxl"
    if len(names) == 1 and not names[0].endswith((".weight", ".bias")):
        return "diffusers"
    return None


def _looks_like_vectors(model: ModelFile, name: str) -> bool:
    info = model.infos[name]
    if info.dtype not in FLOAT_DTYPES:
        return False
    return len(info.shape) == 1 or (len(info.shape) == 2 and info.shape[0] <= _MAX_VECTORS)


def identify_embedding(model: ModelFile, layout: str, hints: MetadataHints) -> Identity:
    identity = Identity(kind="embedding", key_convention=_CONVENTIONS[layout])
    if layout == "kohya-sdxl":
        widths = {"text_encoder": model.shape("clip_l")[-1], "text_encoder_2": model.shape("clip_g")[-1]}
        vectors = model.shape("clip_g")[0] if len(model.shape("clip_g")) == 2 else 1
        family = "sdxl-base"
    else:
        name = _vector_tensor(model, layout)
        shape = model.shape(name)
        widths = {"text_encoder": shape[-1]}
        vectors = shape[0] if len(shape) == 2 else 1
        family = FAMILY_BY_EMBEDDING_WIDTH.get(shape[-1], "unknown")
    identity.family = hints.family or family
    identity.components = list(widths)
    identity.precision = precision_of(
        model, lambda name: "text_encoder_2" if name == "clip_g" else "text_encoder")
    mismatches = _width_mismatches(identity.family, widths)
    identity.nonstandard = bool(mismatches)
    token = _token_name(model, layout)
    identity.facts.update({"vectors": vectors, "widths": widths, "layout": layout})
    if token:
        identity.facts["token"] = token
    identity.notes.append(_summary(vectors, widths, token, model))
    if mismatches:
        identity.notes.append("non-standard dimensions: " + "; ".join(mismatches))
    if model.metadata.get("modelspec.is_negative_embedding", "").lower() == "true":
        identity.notes.append("negative embedding")
    return identity


def _vector_tensor(model: ModelFile, layout: str) -> str:
    if layout == "a1111":
        return next(name for name in model.infos if name.startswith(_A1111_PREFIX))
    return next(iter(model.infos))


def _width_mismatches(family: str, widths: dict[str, int]) -> list[str]:
    ref = FAMILIES.get(family)
    if ref is None:
        return [f"vector width {w} matches no known text encoder" for w in widths.values()]
    expected = {spec.component: spec.width for spec in ref.text_encoders}
    if family == "sdxl-base" and list(widths) == ["text_encoder"]:
        expected = {"text_encoder": 1280}  # a lone bigG vector
    return [f"{component} width {width} ({family} has {expected[component]})"
            for component, width in widths.items()
            if component in expected and width != expected[component]]


def _token_name(model: ModelFile, layout: str) -> str | None:
    if layout == "a1111":
        name = model.extra.get("name")
        return str(name) if name else None
    if layout == "diffusers":
        return next(iter(model.infos))
    return None


def _summary(vectors: int, widths: dict[str, int], token: str | None, model: ModelFile) -> str:
    width_text = " + ".join(str(w) for w in widths.values())
    parts = [f"{vectors} vector{'s' if vectors != 1 else ''} of width {width_text}"]
    if token:
        parts.append(f"token {token!r}")
    step = model.extra.get("step")
    if step is not None:
        parts.append(f"trained {step} steps")
    base = model.extra.get("sd_checkpoint_name")
    if base:
        parts.append(f"on {base}")
    return ", ".join(parts)
