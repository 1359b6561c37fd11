"""A1111 prompt syntax for adapters: `<lora:name:0.8>`, `<lyco:name:0.8>`,
`<hypernet:name:1>`, and embeddings named by their file stem.

Extra-network tags follow A1111's `<kind:arg:arg...>` form, arguments positional or
`key=value`. For LoRA / LyCORIS the first number is the text-encoder strength and a second
one (or `unet=`) the UNet strength, which otherwise equals the first (`te=` names the
first); a missing strength is 1. Tags of these kinds are taken out of the text sent to
the text encoder; tags of other kinds stay in it. Embeddings are found as whole words
(case-insensitive, as CLIP lowercases text), also in ComfyUI's `embedding:name` spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdkit.errors import SdkitError

LORA_KINDS = ("lora", "lyco")
HYPERNET_KIND = "hypernet"
_TAG = re.compile(r"<(\w+):([^<>]+)>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class NetworkTag:
    """One extra-network tag of a prompt."""

    kind: str  # "lora" | "hypernet" (`lyco` tags are LoRA tags)
    name: str
    te_strength: float
    unet_strength: float
    text: str  # the tag as written


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SdkitError(f"prompt tag {tag}: {value!r} is not a number") from None


def _parse_tag(kind: str, body: str, text: str) -> NetworkTag:
    name, *args = body.split(":")
    if not name.strip():
        raise SdkitError(f"prompt tag {text}: no name")
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    te_text = named.get("te", positional[0] if positional else "1")
    te = _number(te_text.strip(), text)
    unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
    unet = te if unet_text is None else _number(unet_text.strip(), text)
    return NetworkTag("lora" if kind in LORA_KINDS else kind, name.strip(), te, unet, text)


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """(the prompt without LoRA / LyCORIS / hypernetwork tags, those tags in order)."""
    tags: list[NetworkTag] = []

    def take(match: re.Match[str]) -> str:
        kind = match.group(1).lower()
        if kind not in (*LORA_KINDS, HYPERNET_KIND):
            return match.group(0)
        tags.append(_parse_tag(kind, match.group(2), match.group(0)))
        return " "

    text = _TAG.sub(take, prompt)
    return _SPACES.sub(" ", text).strip(), tags


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(?:embedding:)?" + re.escape(name) + r"(?![\w-])", re.IGNORECASE)


def mentions(text: str, name: str) -> bool:
    """Whether `name` appears in `text` as a word (or as `embedding:name`)."""
    return _name_pattern(name).search(text) is not None


def replace_name(text: str, name: str, replacement: str) -> str:
    """`text` with every word-mention of `name` replaced."""
    return _name_pattern(name).sub(lambda _: replacement, text)


def format_strength(value: float) -> str:
    return f"{value:g}"


def lora_tag(name: str, te_strength: float, unet_strength: float) -> str:
    """The A1111 tag that applies a LoRA at these strengths."""
    if te_strength == unet_strength:
        return f"<lora:{name}:{format_strength(te_strength)}>"
    return f"<lora:{name}:{format_strength(te_strength)}:{format_strength(unet_strength)}>"


def hypernet_tag(name: str, strength: float) -> str:
    return f"<hypernet:{name}:{format_strength(strength)}>"
