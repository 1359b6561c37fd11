"""Sampler names of sdkit, A1111 and ComfyUI: the diffusers class and flags each builds
(oracle: diffusers' A1111 / k-diffusion table, docs/source/en/api/schedulers/overview.md),
the labels A1111 writes for them (its `get_sampler_and_scheduler`), and sigma schedules
equal to k-diffusion's / A1111's / ComfyUI's formulas, computed here from the betas."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sdkit.errors import SdkitError
from sdkit.runtime.sample.scheduler import SHORT_NAMES, make_scheduler, resolve_sampler

# SD1.5's scheduler config, as its model_index ships it
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon", "clip_sample": False,
        "set_alpha_to_one": False}
HAS_SCIPY = importlib.util.find_spec("scipy") is not None

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# diffusers' table: A1111 / k-diffusion name -> class and init flags
DIFFUSERS_TABLE = [
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", SDE),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    ("DPM++ SDE", "DPMSolverSinglestepScheduler", {}),
    ("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", KARRAS),
    ("DPM2", "KDPM2DiscreteScheduler", {}),
    ("DPM2 Karras", "KDPM2DiscreteScheduler", KARRAS),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
    ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", KARRAS),
    ("Euler", "EulerDiscreteScheduler", {}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("Heun", "HeunDiscreteScheduler", {}),
    ("LMS", "LMSDiscreteScheduler", {}),
    ("LMS Karras", "LMSDiscreteScheduler", KARRAS),
]
# the schedule rows of the same page: schedule type -> init flags
SCHEDULE_TABLE = {
    "Karras": KARRAS,
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Simple": {"timestep_spacing": "trailing"},
    "Exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
}


def _class_name(name: str) -> str:
    return resolve_sampler(name).scheduler


@pytest.mark.parametrize("name, cls, flags", DIFFUSERS_TABLE)
def test_a1111_names_build_the_class_of_diffusers_table(name, cls, flags):
    if cls == "LMSDiscreteScheduler" and not HAS_SCIPY:  # diffusers' LMS imports scipy
        with pytest.raises(SdkitError, match="'LMS' needs the scipy package") as caught:
            resolve_sampler(name)
        assert "\n" not in str(caught.value)
        return
    assert resolve_sampler(name).scheduler == cls
    scheduler = make_scheduler(name, SD15)
    assert type(scheduler).__name__ == cls
    for flag, value in flags.items():
        assert scheduler.config[flag] == value, flag
    # A1111's named samplers with a Karras or Exponential default (sd_samplers_kdiffusion.py)
    # only get it through "Automatic"; a name without the suffix here is the table's plain row
    # unless the sampler's A1111 default says otherwise
    if "use_karras_sigmas" in scheduler.config and not flags.get("use_karras_sigmas"):
        default_karras = name in ("DPM++ 2M", "DPM++ SDE", "DPM2", "DPM2 a")
        assert scheduler.config.use_karras_sigmas is default_karras
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


@pytest.mark.parametrize("schedule, flags", SCHEDULE_TABLE.items())
def test_schedule_types_set_the_flags_of_diffusers_table(schedule, flags):
    scheduler = make_scheduler("Euler", SD15, schedule=schedule)
    for flag, value in flags.items():
        assert scheduler.config[flag] == value


@pytest.mark.parametrize("name, schedule, expected", [
    # A1111 new style: sampler + "Schedule type"; old style: the type in the name
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", "karras")),
    ("dpm++ 2m karras", None, ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", "karras")),
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Automatic", "DPMSolverMultistepScheduler", "karras")),
    ("DPM++ 2M SDE", None, ("DPM++ 2M SDE", "Automatic", "DPMSolverMultistepScheduler", "exponential")),
    ("DPM++ 3M SDE", None, ("DPM++ 3M SDE", "Automatic", "DPMSolverMultistepScheduler", "exponential")),
    ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras", "DPMSolverMultistepScheduler", "karras")),
    ("Euler", "SGM Uniform", ("Euler", "SGM Uniform", "EulerDiscreteScheduler", "sgm")),
    ("EULER A", None, ("Euler a", "Automatic", "EulerAncestralDiscreteScheduler", "model")),
    ("k_dpmpp_2m", "exponential", ("DPM++ 2M", "Exponential", "DPMSolverMultistepScheduler", "exponential")),
    ("DDIM", None, ("DDIM", "Automatic", "DDIMScheduler", "model")),
    ("PLMS", None, ("PLMS", "Automatic", "PNDMScheduler", "model")),
    ("UniPC", None, ("UniPC", "Automatic", "UniPCMultistepScheduler", "model")),
    ("LCM", None, ("LCM", "Automatic", "LCMScheduler", "model")),
    # ComfyUI sampler_name + scheduler
    ("euler", "normal", ("Euler", "Normal", "EulerDiscreteScheduler", "model")),
    ("euler_ancestral", "simple", ("Euler a", "Simple", "EulerAncestralDiscreteScheduler", "sgm")),
    ("dpmpp_2m", "karras", ("DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", "karras")),
    ("dpmpp_2m_sde_gpu", "exponential", ("DPM++ 2M SDE", "Exponential", "DPMSolverMultistepScheduler", "exponential")),
    ("dpmpp_sde", "karras", ("DPM++ SDE", "Karras", "DPMSolverSinglestepScheduler", "karras")),
    ("dpmpp_3m_sde", "sgm_uniform", ("DPM++ 3M SDE", "SGM Uniform", "DPMSolverMultistepScheduler", "sgm")),
    ("heun", "karras", ("Heun", "Karras", "HeunDiscreteScheduler", "karras")),
    ("dpm_2", "normal", ("DPM2", "Normal", "KDPM2DiscreteScheduler", "model")),
    ("dpm_2_ancestral", "karras", ("DPM2 a", "Karras", "KDPM2AncestralDiscreteScheduler", "karras")),
    ("ddim", "ddim_uniform", ("DDIM", "DDIM", "DDIMScheduler", "ddim")),
    ("uni_pc", "sgm_uniform", ("UniPC", "SGM Uniform", "UniPCMultistepScheduler", "sgm")),
    ("lcm", "sgm_uniform", ("LCM", "SGM Uniform", "LCMScheduler", "sgm")),
])
def test_names_resolve_to_a1111_labels_and_settings(name, schedule, expected):
    label, schedule_type, cls, kind = expected
    choice = resolve_sampler(name, schedule)
    assert (choice.a1111_name, choice.schedule_type, choice.scheduler) == (label, schedule_type, cls)
    config = make_scheduler(name, SD15, schedule=schedule).config
    spacing = {"model": "leading", "sgm": "trailing", "karras": None, "exponential": None, "ddim": "leading"}[kind]
    if spacing is not None and "timestep_spacing" in config:
        assert config.timestep_spacing == spacing
    assert config.get("use_karras_sigmas", False) is (kind == "karras")
    assert config.get("use_exponential_sigmas", False) is (kind == "exponential")


def test_sdkit_short_names_keep_their_samplers():
    expected = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-karras": "DPMSolverMultistepScheduler",
                "ddim": "DDIMScheduler", "lcm": "LCMScheduler", "heun": "HeunDiscreteScheduler",
                "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler"}
    assert {name: _class_name(name) for name in SHORT_NAMES} == expected
    # dpm++2m draws the model's own schedule, so A1111 reads it as Uniform, not its Karras default
    assert resolve_sampler("dpm++2m").schedule_type == "Uniform"
    assert make_scheduler("dpm++2m", SD15).config.use_karras_sigmas is False
    assert resolve_sampler("dpm++2m-karras").schedule_type == "Karras"
    assert resolve_sampler("euler", "karras").schedule_type == "Karras"


@pytest.mark.parametrize("name, schedule, expected", [
    ("nope", None, "unknown scheduler 'nope'"),
    ("DPM fast", None, "has no diffusers equivalent"),
    ("dpmpp_2s_ancestral", None, "has no diffusers equivalent"),
    ("Euler a", "Karras", "has no use_karras_sigmas"),
    ("Euler a Karras", None, "has no use_karras_sigmas"),
    ("DPM++ SDE", "SGM Uniform", "has no timestep_spacing"),
    ("DDIM", "Exponential", "has no use_exponential_sigmas"),
    ("Euler", "Align Your Steps", "unknown schedule type"),
    ("euler", "kl_optimal", "unknown schedule type"),
])
def test_unknown_names_and_pairs_diffusers_cannot_draw_are_refused_in_one_line(name, schedule, expected):
    with pytest.raises(SdkitError, match=expected) as caught:
        resolve_sampler(name, schedule)
    message = str(caught.value)
    assert "\n" not in message and "choose" in message
    if "unknown scheduler" in message or "equivalent" in message:
        assert "DPM++ 2M" in message and "euler-a" in message  # the choices are listed
    if "unknown schedule type" in message:
        assert "Karras" in message and "SGM Uniform" in message


def test_flow_models_take_only_euler():
    assert resolve_sampler("Euler", flow=True).scheduler == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(SdkitError, match="does not sample flow-matching"):
        resolve_sampler("DPM++ 2M Karras", flow=True)
    with pytest.raises(SdkitError, match="does not apply to flow-matching"):
        resolve_sampler("euler", "karras", flow=True)


# ---- sigma schedules, from the definitions ------------------------------------------------

RTOL = 2e-5  # diffusers keeps the cumulative product of 1000 alphas in float32

def _model_sigmas() -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) of SD's scaled-linear betas, in float64."""
    betas = np.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """k-diffusion get_sigmas_karras (Karras et al. 2022, eq. 5), zero appended."""
    ramp = np.linspace(0, 1, n)
    inner = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return np.append(inner ** rho, 0.0)


def _exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """k-diffusion get_sigmas_exponential: evenly spaced in log sigma, zero appended."""
    return np.append(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)), 0.0)


def _simple(n: int, sigmas: np.ndarray) -> np.ndarray:
    """A1111's / ComfyUI's simple_scheduler: every len/n-th model sigma from the top."""
    step = len(sigmas) / n
    return np.append([sigmas[-(1 + int(x * step))] for x in range(n)], 0.0)


def _sgm_uniform_timesteps(n: int) -> np.ndarray:
    """A1111's / ComfyUI's sgm_uniform: n timesteps evenly from the top one, the last left out."""
    return np.linspace(999, 0, n + 1)[:-1]


def _sigmas(name: str, schedule: str, steps: int) -> np.ndarray:
    scheduler = make_scheduler(name, SD15, schedule=schedule)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M", "DPM++ SDE", "UniPC", "Heun", "dpmpp_2m_sde"])
@pytest.mark.parametrize("steps", [7, 20, 30])
def test_karras_and_exponential_sigmas_are_k_diffusions(name, steps):
    model = _model_sigmas()
    for schedule, formula in (("karras", _karras), ("exponential", _exponential)):
        ours = _sigmas(name, schedule, steps)
        if name == "Heun":  # second order: every inner sigma twice
            ours = np.append(ours[:1], ours[1::2])
        expected = formula(steps, model[0], model[-1])
        np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=1e-6, err_msg=schedule)


@pytest.mark.parametrize("steps", [4, 20, 25, 50])
def test_simple_schedule_is_a1111s_where_steps_divide_the_training_steps(steps):
    ours = _sigmas("Euler", "simple", steps)
    np.testing.assert_allclose(ours, _simple(steps, _model_sigmas()), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 20, 30])
def test_sgm_uniform_is_within_one_and_a_half_training_steps_of_a1111s(steps):
    """diffusers' documented equivalent (trailing spacing) starts at the top timestep as
    SGM Uniform does, then steps 1000/n instead of 999/n (under one timestep off in all)
    and rounds to whole timesteps (half a timestep more)."""
    scheduler = make_scheduler("Euler", SD15, schedule="SGM Uniform")
    scheduler.set_timesteps(steps)
    difference = np.abs(scheduler.timesteps.double().numpy() - _sgm_uniform_timesteps(steps))
    assert difference[0] == 0 and difference.max() <= 1.5


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_schedule_is_a1111s_ddim_discretization(steps):
    """A1111's DDIM schedule (sd_schedulers.ddim_scheduler): timesteps 1, 1 + 1000//n, ..."""
    scheduler = make_scheduler("Euler", SD15, schedule="DDIM")
    scheduler.set_timesteps(steps)
    expected = np.arange(1, 1000, 1000 // steps)[::-1]
    np.testing.assert_array_equal(scheduler.timesteps.numpy().round().astype(int), expected)


def test_automatic_uses_each_samplers_a1111_default():
    model = _model_sigmas()
    np.testing.assert_allclose(_sigmas("DPM++ 2M", "Automatic", 12), _karras(12, model[0], model[-1]), rtol=RTOL)
    np.testing.assert_allclose(_sigmas("DPM++ 2M SDE", "Automatic", 12), _exponential(12, model[0], model[-1]),
                               rtol=RTOL)


def test_xy_axes_take_sampler_and_schedule_names():
    from sdkit.runtime.sample.grid import parse_axis

    assert parse_axis("scheduler=DPM++ 2M Karras, euler_ancestral").values == ("DPM++ 2M Karras", "euler_ancestral")
    assert parse_axis("schedule=Karras,SGM Uniform").values == ("Karras", "SGM Uniform")
    assert parse_axis("denoise=0.3,0.6").values == (0.3, 0.6)
