"""Epsilon or v-prediction, with the evidence that decided it.

No weight marks SD2 v-prediction for sure (formats.md (g)); in order of trust:
metadata (`modelspec.prediction_type`, `-768-v` architectures, kohya `_v` versions), marker
keys (`v_pred`, `edm_vpred.sigma_max`, ComfyUI SDXL), the diffusers scheduler config, then
ComfyUI's SD2 test: the spread of one LayerNorm bias (`std > 0.09` means v).
"""

from __future__ import annotations

from typing import Any, Mapping

from sdkit.arch.families import FAMILIES
from sdkit.arch.keyview import KeyView
from sdkit.arch.metadata import MetadataHints
from sdkit.io.model_file import ModelFile

SD2_V_STD_THRESHOLD = 0.09
# the LayerNorm ComfyUI's test reads, in each naming convention
_SD2_PROBE_KEYS = ("output_blocks.11.1.transformer_blocks.0.norm1.bias",
                   "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias")
_V_MARKERS = ("v_pred", "edm_vpred.sigma_max")
# ComfyUI reads `ztsnr` as "rescale the schedule to zero terminal SNR" (model_detection /
# model_sampling `zsnr`), NoobAI-XL v-pred ships it; diffusers says `rescale_betas_zero_snr`,
# sd-scripts records `ss_zero_terminal_snr`
ZTSNR_MARKER = "ztsnr"


def denoiser_prediction(family: str, variant: str, model: ModelFile, denoiser: KeyView | None,
                        hints: MetadataHints,
                        scheduler_config: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """(prediction, evidence) for a model holding a denoiser."""
    if hints.prediction:
        return hints.prediction, hints.prediction_source
    marker = next((key for key in _V_MARKERS if key in model.infos), None)
    if marker:
        return "v", f"marker key `{marker}`"
    declared = (scheduler_config or {}).get("prediction_type")
    if declared in ("epsilon", "v_prediction"):
        return ("v" if declared == "v_prediction" else "epsilon"), "scheduler config prediction_type"
    kind = FAMILIES[family].prediction if family in FAMILIES else None
    if kind == "flow":
        return "unknown", "flow-matching model (predicts neither epsilon nor v)"
    if kind == "edm":
        return "unknown", "EDM model: see its scheduler"
    if kind == "v-or-epsilon":
        return _sd2_prediction(variant, denoiser)
    if kind == "epsilon":
        return "epsilon", f"no v-prediction marker; {family} models are epsilon by default"
    return "unknown", None


def _sd2_prediction(variant: str, denoiser: KeyView | None) -> tuple[str, str | None]:
    if variant != "normal":
        return "epsilon", "SD2 inpainting and depth models are epsilon"
    key = next((k for k in _SD2_PROBE_KEYS if denoiser is not None and denoiser.has(k)), None)
    if key is None:
        return "unknown", "no metadata and no weight to test"
    std = float(denoiser.load(key).float().std(unbiased=False))
    if std > SD2_V_STD_THRESHOLD:
        return "v", f"std of {key} = {std:.3f} > {SD2_V_STD_THRESHOLD} (weight heuristic)"
    return "epsilon", f"std of {key} = {std:.3f} <= {SD2_V_STD_THRESHOLD} (weight heuristic)"


def zero_terminal_snr(model: ModelFile, scheduler_config: Mapping[str, Any] | None) -> str | None:
    """The evidence that the model was trained for a zero-terminal-SNR schedule, or None."""
    if ZTSNR_MARKER in model.infos:
        return f"marker key `{ZTSNR_MARKER}`"
    if (scheduler_config or {}).get("rescale_betas_zero_snr") is True:
        return "scheduler config rescale_betas_zero_snr"
    if str(model.metadata.get("ss_zero_terminal_snr", "")).lower() == "true":
        return "ss_zero_terminal_snr metadata"
    return None
