"""Samplers by name: diffusers schedulers configured from the model's own schedule.

Every scheduler is made with `from_config` over the model's scheduler config (its
betas, training steps, prediction type, timestep spacing), so a v-prediction model stays
one whatever the sampler. Names are the ones users type; each also carries the
`Sampler` and `Schedule type` labels A1111 writes into PNG parameters, so the WebUIs and
civitai show the closest sampler of their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdkit.errors import SdkitError


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    a1111_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    karras: bool = False
    second_order: bool = False  # A1111 counts two model calls per step

    @property
    def schedule_type(self) -> str:
        return "Karras" if self.karras else "Automatic"


_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("EulerDiscreteScheduler", "Euler"),
    "euler-a": SamplerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++2m": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M", _DPM_2M),
    "dpm++2m-karras": SamplerSpec("DPMSolverMultistepScheduler", "DPM++ 2M", _DPM_2M, karras=True),
    "ddim": SamplerSpec("DDIMScheduler", "DDIM"),
    "lcm": SamplerSpec("LCMScheduler", "LCM"),
    "heun": SamplerSpec("HeunDiscreteScheduler", "Heun", second_order=True),
    "pndm": SamplerSpec("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "unipc": SamplerSpec("UniPCMultistepScheduler", "UniPC"),
}


# rectified-flow models: the diffusers schedulers FluxPipeline can drive (it passes its own
# sigmas and the resolution shift `mu`)
FLOW_SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("FlowMatchEulerDiscreteScheduler", "Euler"),
}
DEFAULT_SAMPLER = "euler-a"
DEFAULT_FLOW_SAMPLER = "euler"


def sampler_spec(name: str, flow: bool = False) -> SamplerSpec:
    table = FLOW_SAMPLERS if flow else SAMPLERS
    spec = table.get(name)
    if spec is None:
        if name in SAMPLERS:
            raise SdkitError(f"scheduler {name!r} does not sample flow-matching models (choose from "
                             f"{', '.join(FLOW_SAMPLERS)})")
        raise SdkitError(f"unknown scheduler {name!r} (choose from {', '.join(table)})")
    return spec


def schedule_steps(name: str, steps: int) -> int:
    """The steps A1111 spreads prompt editing over: its `total_steps`, twice the steps for a
    second-order sampler (whose last step makes one call, so the last listed step is never reached)."""
    return steps * 2 if sampler_spec(name).second_order else steps


def make_scheduler(name: str, model_config: Mapping[str, Any], flow: bool = False) -> Any:
    """A fresh scheduler `name` over the model's schedule."""
    import diffusers

    spec = sampler_spec(name, flow)
    cls = getattr(diffusers, spec.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    settings = {key: value for key, value in model_config.items() if key in accepted}
    settings.update(spec.overrides)
    if "use_karras_sigmas" in accepted:  # the model's config must not turn Karras on silently
        settings["use_karras_sigmas"] = spec.karras
    return cls(**settings)
