"""Recognise A1111 hypernetworks (formats.md (d)).

The pickled dict `{<width>: (sd_k, sd_v), "layer_structure": [...], ...}` reaches us
flattened: tensors `<width>.<0|1>.linear.<i>.weight|bias` (older files `linear1` /
`linear2`), the other entries in `extra`. The widths are the attention context widths the
hypernetwork applies to, so the text width among them names the family.
"""

from __future__ import annotations

import re

from sdkit.arch.hygiene import precision_of
from sdkit.arch.identity import Identity
from sdkit.io.model_file import ModelFile

# widths have at most 18 digits (< 2**63), so that a key can never name a width that
# no tensor could have (or one too long for int())
_MODULE_KEY = re.compile(r"^(\d{1,18})\.[01]\.(linear\.\d{1,9}|linear[12])\.(weight|bias)$")
_CONTEXT_FAMILIES = ((768, "sd1"), (1024, "sd2"), (2048, "sdxl-base"))
_SETTINGS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
             "use_dropout", "dropout_structure", "activate_output", "last_layer_dropout",
             "name", "step", "sd_checkpoint_name")
_PLAIN_DEPTH = 4
_SHOWN_ENTRIES = 8
_SHOWN_CHARS = 200


def is_hypernetwork(model: ModelFile) -> bool:
    names = list(model.infos)
    return bool(names) and all(_MODULE_KEY.match(name) for name in names)


def identify_hypernetwork(model: ModelFile) -> Identity:
    sizes = sorted({int(_MODULE_KEY.match(name).group(1)) for name in model.infos})
    family = next((fam for width, fam in _CONTEXT_FAMILIES if width in sizes), "unknown")
    identity = Identity(kind="hypernetwork", family=family, key_convention="a1111",
                        components=["unet"])
    identity.precision = precision_of(model, lambda _name: "unet")
    settings = {key: _plain(model.extra[key]) for key in _SETTINGS if key in model.extra}
    identity.facts.update({"sizes": sizes, **settings})
    identity.notes.append(_summary(sizes, settings))
    if family == "unknown":
        identity.nonstandard = True
        identity.notes.append(f"non-standard dimensions: widths {sizes} include no known "
                              "text-context width (768, 1024, 2048)")
    return identity


def _plain(value: object, depth: int = 0) -> object:
    """JSON-friendly copy of a pickled setting (tuples become lists); settings are flat
    lists, so anything nested deeper is shown by its type alone."""
    if isinstance(value, (list, tuple)):
        if depth >= _PLAIN_DEPTH:
            return f"<nested {type(value).__name__}>"
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return f"<{type(value).__name__}>"


def shown_setting(value: object) -> str:
    """A setting for a one-line note or message: a hostile file's layer_structure can be
    millions of entries long, so long lists end with their length."""
    if isinstance(value, (list, tuple)):
        if len(value) <= _SHOWN_ENTRIES:
            return str(list(value))
        head = ", ".join(map(str, value[:_SHOWN_ENTRIES]))
        return f"[{head}, … ({len(value)} entries)]"
    text = str(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _summary(sizes: list[int], settings: dict[str, object]) -> str:
    name = settings.get("name")
    parts = [f"hypernetwork{f' {shown_setting(name)!r}' if name else ''} for widths {shown_setting(sizes)}"]
    if "layer_structure" in settings:
        parts.append(f"layers {shown_setting(settings['layer_structure'])}")
    if settings.get("activation_func"):
        parts.append(f"activation {shown_setting(settings['activation_func'])}")
    if "is_layer_norm" in settings:
        parts.append("layer norm" if settings["is_layer_norm"] else "no layer norm")
    if settings.get("step") is not None:
        parts.append(f"step {shown_setting(settings['step'])}")
    return ", ".join(parts)
