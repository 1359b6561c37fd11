"""Samplers by name: diffusers schedulers configured from the model's own schedule.

Every scheduler is made with the model's scheduler config (its betas, training steps,
prediction type, timestep spacing), so a v-prediction model stays one whatever the
sampler. A sampler is chosen by any name people type, matched case-insensitively:

- sdkit's short names (`euler`, `euler-a`, `dpm++2m-karras`, ...);
- A1111's sampler labels, new style with a separate schedule type ("DPM++ 2M" +
  "Karras") or old style with the schedule in the name ("DPM++ 2M Karras", "LMS
  Karras"), and A1111's `k_...` aliases;
- ComfyUI's `sampler_name` values (`dpmpp_2m`, `euler_ancestral`, ...), with ComfyUI's
  `scheduler` values (`normal`, `karras`, `sgm_uniform`, ...) as the schedule.

The sampler-to-class table is diffusers' own A1111 / k-diffusion equivalence table
(docs/source/en/api/schedulers/overview.md); the schedule types are diffusers' flags
from the same page. A1111's "Automatic" is each sampler's own default (`scheduler`
option of `modules/sd_samplers_kdiffusion.py`: Karras for DPM++ 2M, Exponential for the
SDE multistep samplers, the model's uniform schedule otherwise). "Uniform" and
"Normal" are the model's own schedule as its scheduler config spaces it. A pair whose
class lacks the schedule's flag (Euler a has no Karras sigmas in diffusers) is refused.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from sdkit.errors import SdkitError


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    a1111_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    default_schedule: str = "uniform"  # what A1111's "Automatic" means for this sampler
    aliases: tuple[str, ...] = ()  # A1111 `k_` names, ComfyUI sampler names
    needs: str | None = None  # a module the diffusers class imports (scipy for LMS)
    timestep_sampler: bool = False  # one of A1111's sd_samplers_timesteps (img2img counts differ)


@dataclass(frozen=True)
class ScheduleSpec:
    label: str  # A1111's "Schedule type"
    flags: dict[str, Any] = field(default_factory=dict)  # the class must take every one
    spacing: dict[str, Any] = field(default_factory=dict)  # applied where the class takes it
    needs: str | None = None


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler: the class and its settings, and the labels A1111 writes."""

    sampler: SamplerSpec
    schedule: ScheduleSpec
    schedule_type: str  # "Automatic" or the schedule's label, as chosen

    @property
    def scheduler(self) -> str:
        return self.sampler.scheduler

    @property
    def a1111_name(self) -> str:
        return self.sampler.a1111_name

    def settings(self, accepted: Any) -> dict[str, Any]:
        settings = {**self.sampler.overrides, **self.schedule.flags}
        settings.update({key: value for key, value in self.schedule.spacing.items() if key in accepted})
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if flag in accepted:  # the model's config must not turn one on silently
                settings.setdefault(flag, False)
        return settings


_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPM_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_DPM_3M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
_SAMPLER_LIST = (
    SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M", _DPM_2M, "karras", ("k_dpmpp_2m", "dpmpp_2m")),
    SamplerSpec("DPMSolverSinglestepScheduler", "DPM++ SDE", {}, "karras",
                ("k_dpmpp_sde", "dpmpp_sde", "dpmpp_sde_gpu")),
    SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M SDE", _DPM_2M_SDE, "exponential",
                ("k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu")),
    SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 3M SDE", _DPM_3M_SDE, "exponential",
                ("k_dpmpp_3m_sde", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu")),
    SamplerSpec("EulerAncestralDiscreteScheduler", "Euler a", {}, "uniform",
                ("k_euler_a", "k_euler_ancestral", "euler_ancestral")),
    SamplerSpec("EulerDiscreteScheduler", "Euler", {}, "uniform", ("k_euler",)),
    SamplerSpec("LMSDiscreteScheduler", "LMS", {}, "uniform", ("k_lms",), needs="scipy"),
    SamplerSpec("HeunDiscreteScheduler", "Heun", {}, "uniform", ("k_heun",)),
    SamplerSpec("KDPM2DiscreteScheduler", "DPM2", {}, "karras", ("k_dpm_2", "dpm_2")),
    SamplerSpec("KDPM2AncestralDiscreteScheduler", "DPM2 a", {}, "karras", ("k_dpm_2_a", "dpm_2_ancestral")),
    SamplerSpec("DDIMScheduler", "DDIM", timestep_sampler=True),
    SamplerSpec("PNDMScheduler", "PLMS", {"skip_prk_steps": True}, timestep_sampler=True),
    SamplerSpec("UniPCMultistepScheduler", "UniPC", {}, "uniform", ("uni_pc", "uni_pc_bh2"), timestep_sampler=True),
    SamplerSpec("LCMScheduler", "LCM"),
)
A1111_SAMPLERS: dict[str, SamplerSpec] = {spec.a1111_name: spec for spec in _SAMPLER_LIST}

_LINSPACE = {"timestep_spacing": "linspace"}  # sigma_max and sigma_min are the model's own
SCHEDULES: dict[str, ScheduleSpec] = {
    "uniform": ScheduleSpec("Uniform"),
    "normal": ScheduleSpec("Normal"),
    "karras": ScheduleSpec("Karras", {"use_karras_sigmas": True}, _LINSPACE),
    "exponential": ScheduleSpec("Exponential", {"use_exponential_sigmas": True}, _LINSPACE),
    "sgm_uniform": ScheduleSpec("SGM Uniform", {"timestep_spacing": "trailing"}),
    "simple": ScheduleSpec("Simple", {"timestep_spacing": "trailing"}),
    "ddim": ScheduleSpec("DDIM", {"timestep_spacing": "leading", "steps_offset": 1}),
    "beta": ScheduleSpec("Beta", {"use_beta_sigmas": True}, _LINSPACE, needs="scipy"),
}
AUTOMATIC = "Automatic"
# A1111 labels and names, ComfyUI scheduler names, lower-case
_SCHEDULE_NAMES = {**{spec.label.lower(): key for key, spec in SCHEDULES.items()}, **{key: key for key in SCHEDULES},
                   "sgmuniform": "sgm_uniform", "ddim_uniform": "ddim"}

# sdkit's own short names: (A1111 sampler, schedule)
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "euler": ("Euler", "automatic"), "euler-a": ("Euler a", "automatic"),
    "dpm++2m": ("DPM++ 2M", "uniform"), "dpm++2m-karras": ("DPM++ 2M", "karras"),
    "ddim": ("DDIM", "automatic"), "lcm": ("LCM", "automatic"), "heun": ("Heun", "automatic"),
    "pndm": ("PLMS", "automatic"), "unipc": ("UniPC", "automatic"),
}
# names people know from A1111 and ComfyUI that diffusers has no scheduler for
NO_EQUIVALENT = ("DPM++ 2S a", "DPM fast", "DPM adaptive", "Restart", "DPM++ 2M SDE Heun", "DDIM CFG++",
                 "dpmpp_2s_ancestral", "dpm_fast", "dpm_adaptive", "ddpm", "euler_cfg_pp", "ipndm", "deis")

_SAMPLER_NAMES = {name.lower(): spec for spec in _SAMPLER_LIST for name in (spec.a1111_name, *spec.aliases)}

# rectified-flow models: the diffusers scheduler FluxPipeline drives (it passes its own
# sigmas and the resolution shift `mu`)
FLOW_SAMPLER = SamplerSpec("FlowMatchEulerDiscreteScheduler", "Euler")
DEFAULT_SAMPLER = "euler-a"
DEFAULT_FLOW_SAMPLER = "euler"


def sampler_names() -> list[str]:
    """Every sampler name accepted, for help texts and refusals: sdkit's, then A1111's."""
    return [*SHORT_NAMES, *A1111_SAMPLERS]


def schedule_names() -> list[str]:
    return [AUTOMATIC, *(spec.label for spec in SCHEDULES.values())]


def _schedule_key(name: str) -> str:
    key = _SCHEDULE_NAMES.get(name.strip().lower())
    if key is None:
        raise SdkitError(f"unknown schedule type {name!r} (choose from {', '.join(schedule_names())})")
    return key


def _split_schedule_suffix(name: str) -> tuple[str, str | None]:
    """A1111's old style: "DPM++ 2M Karras" -> ("dpm++ 2m", "karras")."""
    for suffix, key in sorted(_SCHEDULE_NAMES.items(), key=lambda item: -len(item[0])):
        if name.endswith(" " + suffix) and name[:-len(suffix) - 1] in _SAMPLER_NAMES:
            return name[:-len(suffix) - 1], key
    return name, None


def _unknown_sampler(name: str) -> SdkitError:
    choices = ", ".join(sampler_names())
    if name.strip().lower() in {other.lower() for other in NO_EQUIVALENT}:
        return SdkitError(f"sampler {name!r} has no diffusers equivalent (choose from {choices})")
    return SdkitError(f"unknown scheduler {name!r} (choose from {choices}; A1111 names may end in a schedule "
                      "type; ComfyUI sampler names work too)")


def resolve_sampler(name: str, schedule: str | None = None, flow: bool = False) -> SamplerChoice:
    """The sampler `name` with schedule type `schedule` (None: the one in the name, else
    Automatic); refused in one line when unknown or when diffusers cannot draw the pair."""
    key = " ".join(name.strip().lower().split())
    short = SHORT_NAMES.get(key)
    if short is not None:
        spec, named = A1111_SAMPLERS[short[0]], short[1]
    else:
        key, named = _split_schedule_suffix(key)
        spec = _SAMPLER_NAMES.get(key)
        if spec is None:
            raise _unknown_sampler(name)
    chosen = _schedule_key(schedule) if schedule is not None and schedule.strip().lower() != "automatic" \
        else (named if named not in (None, "automatic") else None)
    if flow:
        return _flow_choice(name, spec, chosen)
    schedule_spec = SCHEDULES[chosen or spec.default_schedule]
    _check_pair(spec, schedule_spec)
    return SamplerChoice(spec, schedule_spec, AUTOMATIC if chosen is None else schedule_spec.label)


def _flow_choice(name: str, spec: SamplerSpec, chosen: str | None) -> SamplerChoice:
    if spec.a1111_name != FLOW_SAMPLER.a1111_name:
        raise SdkitError(f"scheduler {name!r} does not sample flow-matching models (choose from euler)")
    if chosen not in (None, "uniform", "normal", "simple"):
        raise SdkitError(f"schedule type {SCHEDULES[chosen].label!r} does not apply to flow-matching models "
                         "(their pipeline sets the sigmas)")
    return SamplerChoice(FLOW_SAMPLER, SCHEDULES["uniform"], AUTOMATIC)


def _check_pair(spec: SamplerSpec, schedule: ScheduleSpec) -> None:
    for needs, what in ((spec.needs, f"sampler {spec.a1111_name!r}"), (schedule.needs, f"schedule {schedule.label!r}")):
        if needs and importlib.util.find_spec(needs) is None:
            raise SdkitError(f"{what} needs the {needs} package (pip install {needs})")
    accepted = _init_parameters(spec.scheduler)
    missing = [flag for flag in schedule.flags if flag not in accepted]
    if missing:
        raise SdkitError(f"sampler {spec.a1111_name!r} cannot use the {schedule.label} schedule: diffusers' "
                         f"{spec.scheduler} has no {missing[0]} (choose another schedule type or sampler)")


def _init_parameters(class_name: str) -> Any:
    import diffusers

    return inspect.signature(getattr(diffusers, class_name).__init__).parameters


def make_scheduler(name: str, model_config: Mapping[str, Any], flow: bool = False,
                   schedule: str | None = None) -> Any:
    """A fresh scheduler `name` (with schedule type `schedule`) over the model's schedule."""
    return build_scheduler(resolve_sampler(name, schedule, flow), model_config)


def build_scheduler(choice: SamplerChoice, model_config: Mapping[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, choice.scheduler)
    accepted = _init_parameters(choice.scheduler)
    settings = {key: value for key, value in model_config.items() if key in accepted}
    settings.update(choice.settings(accepted))
    return cls(**settings)
