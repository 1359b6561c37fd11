"""Can a VAE serve a diffusion model? The answer the headers give, for every family.

A VAE fits a base only when it makes the latents the base's denoiser works on: the same
number of latent channels, the same kind of VAE (2-D image or 3-D causal video: a Wan 2.1
VAE and an SD3 VAE both have 16 channels, but different latents), a design some family of
the base's uses, and — where the VAE states it (a diffusers config's `scaling_factor` /
`shift_factor`, metadata) — the base family's latent format. Any of these failing means
*incompatible* with no numbers run. Passing them says the VAE is of the right kind; two
VAEs of one design (SD3's and FLUX.1's) are told apart only by their weights, which the
numeric check of `sdkit.runtime.vae_check` measures where it can run the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdkit.arch.families import FAMILIES, Family, LatentFormat
from sdkit.arch.identity import Identity


@dataclass
class VaeFit:
    fits: bool
    problems: list[str] = field(default_factory=list)
    expected_latent_channels: int | None = None
    latent_channels: int | None = None
    shared_design: list[str] = field(default_factory=list)  # other families with this VAE design


def base_latent(identity: Identity) -> LatentFormat:
    """The latent format the base's denoiser works in: its release's, else its family's."""
    family = FAMILIES[identity.family]
    release = family.release(identity.facts.get("release") or "")
    return release.latent if release is not None and release.latent is not None else family.latent


def vae_fit(base: Identity, vae: Identity) -> VaeFit:
    """Whether `vae` (a VAE's identity) can stand in for `base`'s VAE, from the headers."""
    family = FAMILIES[base.family]
    wanted = base_latent(base)
    channels = vae.facts.get("latent_channels")
    video = bool((vae.facts.get("vae") or {}).get("video"))
    fit = VaeFit(True, expected_latent_channels=wanted.channels, latent_channels=channels)
    if channels != wanted.channels:
        fit.problems.append(f"{channels} latent channels; {family.title} works on {wanted.channels}")
    elif video != wanted.video:
        fit.problems.append(f"{_kind(video)} VAE; {family.title} takes {_kind(wanted.video)} VAE")
    elif base.family not in (vae.facts.get("compatible_families") or []):
        fit.problems.append(f"a VAE design no {family.title} model uses")
    elif vae.facts.get("stated_latent") and base.family not in vae.facts["stated_latent"]["families"]:
        fit.problems.append(_stated_latent_problem(vae.facts["stated_latent"], family, wanted))
    elif vae.family in FAMILIES and not _same_latent_space(FAMILIES[vae.family], family, wanted):
        fit.problems.append(f"its metadata names it {FAMILIES[vae.family].title}'s VAE, "
                            f"whose latents are not {family.title}'s")
    fit.fits = not fit.problems
    fit.shared_design = [name for name in vae.facts.get("compatible_families") or []
                         if name != base.family and not _same_latent_space(FAMILIES[name], family, wanted)]
    return fit


def _stated_latent_problem(stated: dict, family: Family, wanted: LatentFormat) -> str:
    owners = ", ".join(FAMILIES[name].title for name in stated["families"]) or "no known family"
    return (f"its config states scaling {stated['scaling_factor']} and shift {stated['shift_factor']} "
            f"({owners}); {family.title} latents are scaled {wanted.scaling_factor}, shifted {wanted.shift_factor}")


def _same_latent_space(other: Family, family: Family, wanted: LatentFormat) -> bool:
    """Families share a latent space when one of `other`'s formats is the base's."""
    return other.name == family.name or any(latent == wanted for latent, _ in other.latents())


def _kind(video: bool) -> str:
    return "a 3-D video" if video else "a 2-D image"
