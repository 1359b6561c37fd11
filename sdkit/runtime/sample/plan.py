"""What a sampling run asks for, resolved to files before any model is loaded.

Adapters come from the command line (`--lora FILE[:W]`, `--hypernet FILE[:W]`,
`--embedding FILE[:TOKEN]`, each a path or a name in the library) and from A1111 tags in
the prompts; both are turned into files here, so a missing adapter is reported before
the minutes a large model may take to load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sdkit.ops.adapter_input import parse_adapter_arg
from sdkit.errors import SdkitError
from sdkit.runtime.sample.library import Library, resolve_file
from sdkit.runtime.sample.lora import LoraRequest
from sdkit.runtime.sample.prompt import extract_networks


@dataclass(frozen=True)
class HypernetRequest:
    path: Path
    name: str
    strength: float = 1.0


@dataclass(frozen=True)
class AdapterArgs:
    """Adapters given on the command line, as `FILE[:STRENGTH]` / `FILE[:TOKEN]` texts."""

    loras: Sequence[str] = ()
    embeddings: Sequence[str] = ()
    hypernets: Sequence[str] = ()


@dataclass(frozen=True)
class Adapters:
    """Command-line adapters resolved to files."""

    loras: tuple[LoraRequest, ...] = ()
    hypernets: tuple[HypernetRequest, ...] = ()
    embeddings: tuple[tuple[Path, str | None], ...] = ()  # (file, token or None: the file's own)


@dataclass(frozen=True)
class PromptPlan:
    """A prompt split into the text for the encoders and the adapters it asks for."""

    text: str  # tags removed, embedding names kept
    loras: tuple[LoraRequest, ...]
    hypernets: tuple[HypernetRequest, ...]
    missing: tuple[str, ...] = ()  # why a prompt tag's adapter was left out


def parse_embedding_arg(text: str) -> tuple[str, str | None]:
    """`FILE[:TOKEN]`; an existing path wins over a split at its last colon."""
    head, sep, tail = text.rpartition(":")
    if Path(text).exists() or not sep or not head or tail.startswith(("\\", "/")):
        return text, None
    return head, tail


def resolve_adapters(args: AdapterArgs, library: Library | None) -> Adapters:
    """The files behind the command-line adapters (one-line errors for missing ones)."""
    loras, hypernets, embeddings = [], [], []
    for text in args.loras:
        item = parse_adapter_arg(text)
        path = resolve_file(item.path, "lora", library, f"--lora {text}")
        loras.append(LoraRequest(path, path.stem, item.strength, item.strength))
    for text in args.hypernets:
        item = parse_adapter_arg(text)
        path = resolve_file(item.path, "hypernetwork", library, f"--hypernet {text}")
        hypernets.append(HypernetRequest(path, path.stem, item.strength))
    for text in args.embeddings:
        file, token = parse_embedding_arg(text)
        embeddings.append((resolve_file(file, "embedding", library, f"--embedding {text}"), token))
    return Adapters(tuple(loras), tuple(hypernets), tuple(embeddings))


def plan_prompt(prompt: str, adapters: Adapters, library: Library | None) -> PromptPlan:
    """The prompt's text and adapters: the command-line ones, then its tags' in order."""
    text, tags = extract_networks(prompt)
    loras = list(adapters.loras)
    hypernets = list(adapters.hypernets)
    missing = []
    for tag in tags:
        kind = "lora" if tag.kind == "lora" else "hypernetwork"
        try:
            path = resolve_file(tag.name, kind, library, f"prompt tag {tag.text}")
        except SdkitError as exc:  # A1111 says it could not find the network and draws without it
            missing.append(f"{exc}; drawn without it, as A1111 does")
            continue
        if kind == "lora":
            loras.append(LoraRequest(path, tag.name, tag.te_strength, tag.unet_strength))
        else:
            hypernets.append(HypernetRequest(path, tag.name, tag.te_strength))
    return PromptPlan(text, tuple(loras), tuple(hypernets), tuple(missing))
