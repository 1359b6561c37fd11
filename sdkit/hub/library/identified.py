"""What a library file is, and which family it is filed under.

The weights decide the family where they name one. Some parts fit several families: a
16-channel VAE serves SD3, FLUX, Z-Image…; a CLIP-L or T5-XXL text encoder is shared
by several families (identify() names CLIP-L's first user, sd1, which says nothing about
the model it was downloaded for). For such a part, and for a file whose family the weights
do not show, Civitai's `baseModel` (stored when the file came from Civitai or was looked
up there) names the family. It never overrides a family the weights decided; where the
two disagree, the entry gets a note saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sdkit.hub.library.index import Entry

if TYPE_CHECKING:
    from sdkit.arch.identity import Identity


class Identified(NamedTuple):
    kind: str
    family: str
    adapter_type: str | None
    part: str = ""
    release: str | None = None
    compatible_families: tuple[str, ...] = ()  # the families a shared part fits; () = one or none

    @property
    def family_decided(self) -> bool:
        """The weights name one family (not a part several families share)."""
        return self.family != "unknown" and len(self.compatible_families) <= 1


UNIDENTIFIED = Identified("unknown", "unknown", None)


def identify_strictly(path: Path) -> Identified:
    """What the file's content says it is; a file `sdkit inspect` refuses raises its
    reason (SdkitError)."""
    from sdkit.arch import identify
    from sdkit.io import open_model

    with open_model(path) as model:
        identity = identify(model)
    return Identified(identity.kind, identity.family, identity.adapter_type, identity.part,
                      identity.facts.get("release"), _compatible_families(identity))


def identify_file(path: Path) -> Identified:
    """What the file's content says it is; unknown when unreadable."""
    try:
        return identify_strictly(path)
    except Exception:  # one odd file must not stop a library of thousands; it stays "unknown"
        return UNIDENTIFIED


def _compatible_families(identity: Identity) -> tuple[str, ...]:
    """The families a VAE (from identify()) or a lone text encoder fits."""
    from sdkit.arch.families import families_using_encoder

    facts = identity.facts
    if facts.get("compatible_families"):
        return tuple(facts["compatible_families"])
    encoders = facts.get("text_encoders") or []
    if identity.kind == "text-encoder" and len(encoders) == 1:
        return tuple(families_using_encoder(encoders[0]["architecture"], encoders[0]["width"]))
    return ()


class Settled(NamedTuple):
    family: str
    release: str | None
    family_source: str | None  # "weights" | "civitai"; None: no one family decided
    notes: list[str]

    @property
    def filing_family(self) -> str:
        """The family whose subfolder the file goes in: "unknown" (no subfolder) for a
        part several families share, unless Civitai named the one it was made for."""
        return self.family if self.family_source is not None else "unknown"


def settled_family(identified: Identified, base_model: str | None) -> Settled:
    """The family from the weights and, where they leave it open, from Civitai's
    `baseModel`; a disagreement becomes a note."""
    from sdkit.arch.families import family_for_civitai_base_model  # only when a file is filed

    source = "weights" if identified.family_decided else None
    weights = Settled(identified.family, identified.release, source, [])
    named = family_for_civitai_base_model(base_model) if base_model else None
    if named is None:
        return weights  # no base model, or one that names no family sdkit knows ("Other")
    family, release = named
    said = f"Civitai lists this file as {base_model} ({family})"
    if identified.family_decided:
        if family != identified.family:
            return weights._replace(notes=[f"{said}; its weights are {identified.family}"])
        return weights._replace(release=identified.release or release)
    if identified.compatible_families and family not in identified.compatible_families:
        return weights._replace(notes=[f"{said}; its weights fit {', '.join(identified.compatible_families)}"])
    return Settled(family, release, "civitai", [])


def base_model_of(hub: dict[str, Any] | None) -> str | None:
    value = (hub or {}).get("base_model")
    return str(value) if value else None


def settle_family(entry: Entry, identified: Identified) -> None:
    """Fill the entry's kind, part, family, release, family_source and notes from the
    weights and the Civitai base model its hub facts hold."""
    entry.kind, entry.adapter_type, entry.part = identified.kind, identified.adapter_type, identified.part
    entry.family, entry.release, entry.family_source, entry.notes = \
        settled_family(identified, base_model_of(entry.hub))
