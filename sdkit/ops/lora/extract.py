"""LoRA from the difference of two checkpoints (extract), and LoRA rank changes (resize).

Extract follows sd-scripts' `extract_lora_from_models`: the layers it adapts are the
Linear and 1×1 conv layers of the UNet's transformer blocks (proj_in / proj_out,
attention q / k / v / out, feed-forward), the text encoders' attention and MLP layers,
and with a conv rank also the ResNet blocks (3×3 convs at the conv rank, their
time-embedding Linear and 1×1 shortcut at the rank) and the down / up samplers. Each
layer's `tuned − base` is factorised (`sdkit.ops.lora.svd`), alpha = rank, both factors
clamped to the 0.99 quantile by default; the text encoders are left out when no weight
differs by more than `min_diff`. The two models may be in either convention: layers are
matched through their names in both. Transformer denoisers (FLUX, SD3, …) are extracted by
`sdkit.ops.lora.extract_transformer`.

Resize follows sd-scripts' `resize_lora`: each module's `up @ down` is re-factorised to
the new rank (or a dynamic one, capped at it), and alpha becomes
`alpha_old / rank_old · rank_new` so the strength of the LoRA is kept; no clamp.
LyCORIS modules are re-factorised from their delta (alpha = the new rank).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sdkit.adapters.lora_export import (ExportModule, LoraFacts, Provenance, kohya_module_name, sdxl_naming,
                                        write_lora)
from sdkit.adapters.lora_names import Target, underscore_names
from sdkit.errors import SdkitError
from sdkit.io.ahead import Prefetcher, single_threaded_torch
from sdkit.io.output_path import check_output_path
from sdkit.ops.lora.compute import is_plain_lora
from sdkit.ops.lora.plan import AdapterInput, OpenBase, family_problem, open_adapter, open_base
from sdkit.ops.lora.convert import in_kohya_layout, transformer_base
from sdkit.ops.lora.merge import DTYPES, Layer, group_layers, lora_dtype, note_dropped_biases, summed_delta
from sdkit.ops.lora.svd import Factors, RankRule, factorize, factorize_product, relative_error

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
_ATTENTION = re.compile(r"(^|\.)attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                        r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
_RESNET = re.compile(r"(^|\.)(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|"
                     r"(down|up)samplers\.0\.conv)$")
# CLIP's attention and MLP, T5's attention and feed-forward (sd-scripts' T5Attention,
# T5DenseGatedActDense targets)
_TEXT = re.compile(r"(^|\.)(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|SelfAttention\.[qkvo]|"
                   r"DenseReluDense\.(wi_0|wi_1|wi|wo))$")


@dataclass(frozen=True)
class ExtractOptions:
    rank: int = 4
    conv_rank: int | None = None  # also adapt ResNet blocks and samplers
    dynamic: str | None = None
    value: float | None = None
    clamp_quantile: float | None = 0.99
    min_diff: float = 0.01
    randomized: bool = False
    oversample: int = 8
    iterations: int = 2
    sample_layers: int = 4  # layers checked against the full SVD with `randomized`
    format: str = "kohya"
    dtype: str | None = None  # default: the base's dtype
    to: str | None = None  # a transformer LoRA's layout: comfyui | kohya | diffusers
    full_diff: bool = False  # transformers: keep other differing tensors whole (diff / diff_b)

    def rule(self) -> RankRule:
        rule = RankRule(self.rank, self.conv_rank, self.dynamic, self.value, self.clamp_quantile,
                        self.randomized, self.oversample, self.iterations)
        rule.check()
        return rule


@dataclass
class LayerReport:
    name: str
    rank: int
    retained: float  # Σσ² kept / Σσ²


@dataclass
class SvdReport:
    """Per-layer ranks and retained energy; randomized runs add sampled errors."""

    output: str
    layers: list[LayerReport] = field(default_factory=list)
    randomized_check: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, factors: Factors) -> None:
        self.layers.append(LayerReport(name, factors.rank, factors.retained))

    def to_json(self) -> dict[str, Any]:
        retained = [layer.retained for layer in self.layers]
        return {"output": self.output, "layers": [asdict(layer) for layer in self.layers],
                "mean_retained": sum(retained) / len(retained) if retained else None,
                "randomized_check": self.randomized_check, "notes": self.notes}


# ---- extract -----------------------------------------------------------------------------

def is_extracted_layer(target: Target, conv_rank: int | None) -> bool:
    """Whether sd-scripts' LoRA network adapts this layer."""
    path = target.diffusers_path
    if path is None or len(target.shape) < 2:
        return False
    if target.component == "unet":
        return bool(_ATTENTION.search(path)) or (conv_rank is not None and bool(_RESNET.search(path)))
    return bool(_TEXT.search(path))


def _counterpart(target: Target, tuned: OpenBase) -> Target:
    for name in sorted(underscore_names(target)):
        hit = tuned.names.names.get((target.component, name))
        if hit is not None:
            if hit.shape != target.shape:
                raise SdkitError(f"{target.path}: shape {list(hit.shape)} in the tuned model, "
                                 f"{list(target.shape)} in the base")
            return hit
    raise SdkitError(f"{target.component}.{target.path}: the tuned model has no such layer")


def _load(opened: OpenBase, target: Target) -> "torch.Tensor":
    """The layer's weight as stored (a view of the file where it can be)."""
    tensor = opened.view.tensors[target.weight.key].load()
    rows = target.weight.rows
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def _delta(tuned: OpenBase, tuned_target: Target, base: OpenBase, base_target: Target) -> "torch.Tensor":
    """`tuned − base` in float32, with one float32 buffer (the subtraction promotes the
    stored halves exactly, so the bits are those of converting both first)."""
    import torch

    delta = _load(tuned, tuned_target).to(torch.float32, copy=True)  # never the file's own buffer
    return delta.sub_(_load(base, base_target))


def extract_lora(tuned: str | os.PathLike[str], base: str | os.PathLike[str],
                 output: str | os.PathLike[str], options: ExtractOptions = ExtractOptions(), *,
                 overwrite: bool = False, progress: Progress | None = None) -> SvdReport:
    """Write the LoRA approximating `tuned − base` to `output`."""
    rule = options.rule()
    output = Path(output)
    check_output_path(output, (tuned, base), force=overwrite)
    report = SvdReport(str(output))
    if transformer_base(str(base)):
        from sdkit.ops.lora.extract_transformer import extract_transformer_lora

        return extract_transformer_lora(tuned, base, output, options, report, overwrite=overwrite, progress=progress)
    options = _sd_layout(options)
    with ExitStack() as stack:
        original = open_base(str(base), stack, transformers=False)
        finetuned = open_base(str(tuned), stack, transformers=False)
        problem = family_problem(original.identity.family, finetuned.identity.family)
        if problem:
            raise SdkitError(f"{tuned}: {problem}")
        pairs = [(t, _counterpart(t, finetuned)) for t in original.names.targets
                 if is_extracted_layer(t, options.conv_rank)]
        pairs = _drop_same_text_encoders(pairs, original, finetuned, options.min_diff, report)
        t5 = _t5_components(original, options)
        sdxl = sdxl_naming(original.identity.family, []) or "text_encoder_2" in original.names.components()
        dtype = _output_dtype(options, original)
        common_alpha = _common_alpha([target for target, _ in pairs], rule) if options.format == "kohya" else None
        held = HeldFactors(dtype, common_alpha)

        def extract(index: int) -> tuple[ExportModule, Factors, dict[str, Any] | None] | None:
            target, other = pairs[index]
            delta = _delta(finetuned, other, original, target)
            module = ExportModule(target.component, target.diffusers_path, target.ldm_path, {})
            if target.component in t5:  # kohya's T5-XXL name in every family
                module.name = "lora_te3_" + target.diffusers_path.replace(".", "_")
            extracted = factorised_layer(module, kohya_module_name(module, sdxl), delta, rule,
                                         check=index < options.sample_layers)
            return None if extracted is None else held.hold(*extracted)

        modules = extract_layers(extract, len(pairs), report, lambda module: kohya_module_name(module, sdxl),
                                 progress)
        if not modules:
            raise SdkitError(f"{output}: nothing to write: the models do not differ in any adapted layer")
        # a lone text encoder serves several families (CLIP-L: SD 1.x, SDXL, FLUX, SD3): none is claimed
        family = "unknown" if original.identity.kind == "text-encoder" else original.identity.family
        facts = LoraFacts(family, "v" if original.identity.prediction == "v" else "epsilon")
        write_lora(output, modules, facts, Provenance("lora-extract", (str(tuned), str(base)), params_of(options)),
                   format=options.format, dtype=dtype, common_alpha=common_alpha, overwrite=overwrite)
    return report


def _t5_components(base: OpenBase, options: ExtractOptions) -> set[str]:
    """The components of `base` that are T5 encoders (a lone T5-XXL file): named as kohya
    names T5-XXL; the diffusers layout is refused, its component differing by family."""
    found = {encoder.get("component") for encoder in base.identity.facts.get("text_encoders") or ()
             if encoder.get("architecture") == "t5"}
    if found and options.format == "diffusers":
        raise SdkitError(f"{base.model.path}: a lone T5 encoder is `text_encoder_2` in FLUX.1's diffusers layout and "
                         "`text_encoder_3` in SD3's; extract it in kohya's layout (lora_te3_), which both read")
    return found


def _sd_layout(options: ExtractOptions) -> ExtractOptions:
    """The options of a UNet extract: `--to` names its format; the transformer-only ones refused."""
    if options.full_diff:
        raise SdkitError("--full-diff is for transformer models (FLUX, SD3, …); a UNet extract adapts layers only")
    if options.to == "comfyui":
        raise SdkitError("--to comfyui is a transformer LoRA layout; a UNet LoRA is written as kohya or diffusers")
    return replace(options, format=options.to) if options.to else options


def _common_alpha(targets: list[Target], rule: RankRule) -> float | None:
    """The alpha the kohya file gives every module (alpha = rank, the others' up factors
    rescaled to it), chosen from the layers' shapes before any is factorised: the rank
    most layers get."""
    ranks = Counter(min(rule.cap_for(t.shape), t.shape[0], math.prod(t.shape[1:])) for t in targets)
    return float(ranks.most_common(1)[0][0]) if ranks else None


class HeldFactors:
    """Where the layers' factors wait for the writer.

    They are kept in the output dtype where that gives the bytes a cast at the end would
    (`down` always; `up` unless the writer rescales it to the common alpha), and packed
    into blocks of their own: allocated one by one they would sit in malloc's arenas
    between the layers' temporaries, whose holes are not given back (an SDXL extract
    grew by the float32 size of every factor, 1.7 GiB at its peak)."""

    BLOCK = 64 << 20

    def __init__(self, dtype: "torch.dtype", common_alpha: float | None) -> None:
        self.dtype = dtype
        self.common_alpha = common_alpha
        self._lock = threading.Lock()
        self._block: "torch.Tensor | None" = None
        self._used = 0

    def hold(self, module: ExportModule, factors: Factors, check: dict[str, Any] | None
             ) -> tuple[ExportModule, Factors, dict[str, Any] | None]:
        tensors = module.tensors
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        rescaled = self.common_alpha is not None and module.alpha != self.common_alpha
        tensors["lora_up.weight"] = self._copy(up, up.dtype if rescaled else self.dtype)
        tensors["lora_down.weight"] = self._copy(down, self.dtype)
        light = replace(factors, up=tensors["lora_up.weight"], down=tensors["lora_down.weight"])
        return module, light, check

    def _copy(self, tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
        """`tensor.to(dtype)` (the same conversion) stored in the current block."""
        import torch

        size = tensor.numel() * dtype.itemsize
        with self._lock:
            if self._block is None or self._used + size > len(self._block):
                self._block = torch.empty(max(self.BLOCK, size), dtype=torch.uint8)
                self._used = 0
            block, start = self._block, self._used
            self._used += -(-size // 64) * 64  # the next one starts aligned
        return block[start:start + size].view(dtype).view(tensor.shape).copy_(tensor)


def _drop_same_text_encoders(pairs: list[tuple[Target, Target]], original: OpenBase, finetuned: OpenBase,
                             min_diff: float, report: SvdReport) -> list[tuple[Target, Target]]:
    """sd-scripts keeps the text encoders only if some weight differs by more than min_diff."""
    text = [(t, o) for t, o in pairs if t.component != "unet"]
    largest = 0.0
    for target, other in text:
        largest = max(largest, float(_delta(finetuned, other, original, target).abs().max()))
        if largest > min_diff:
            return pairs
    if text:
        report.notes.append(f"text encoders left out: no weight differs by more than {min_diff} "
                            f"(largest {largest:.3g})")
    return [(t, o) for t, o in pairs if t.component == "unet"]


def extract_layers(extract: Callable[[int], Any], count: int, report: SvdReport, name_of: Callable[[ExportModule], str],
                   progress: Progress | None) -> list[ExportModule]:
    """The modules `extract(0 … count−1)` makes (None: an identical layer), in order, with
    each one's rank and retained energy in `report`."""
    modules, identical = [], 0
    # layers are factorised two at a time on worker threads, one torch thread each: an
    # SVD of a few-hundred-wide matrix gains little from more, and with a fixed count
    # its bits do not depend on the machine's load
    with single_threaded_torch(), Prefetcher(extract, threads=1).start(range(count)) as ahead:
        for index in range(count):
            extracted = ahead.get(index)
            if extracted is None:
                identical += 1
            else:
                module, factors, check = extracted
                report.add(name_of(module), factors)
                if check is not None:
                    report.randomized_check.append(check)
                modules.append(module)
            if progress is not None:
                progress(1)
    if identical:
        report.notes.append(f"{identical} layers are identical in both models and left out")
    return modules


def factorised_layer(module: ExportModule, name: str, delta: "torch.Tensor", rule: RankRule, check: bool
                     ) -> tuple[ExportModule, Factors, dict[str, Any] | None] | None:
    """`module` holding the factors of one layer's delta (None when it is zero), the
    factors, and with `check` and a randomized rule its error next to the full SVD's."""
    if not bool(delta.any()):
        return None
    factors = factorize(delta, rule)
    comparison = None
    if rule.randomized and check:
        full = factorize(delta, replace(rule, randomized=False, dynamic=None), cap=factors.rank)
        comparison = {"layer": name, "rank": factors.rank, "error_randomized": relative_error(delta, factors),
                      "error_full_svd": relative_error(delta, full)}
    module.tensors = {"lora_up.weight": factors.up, "lora_down.weight": factors.down}
    module.alpha = float(factors.rank)
    return module, factors, comparison


def params_of(options: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if v is not None}


def _output_dtype(options: ExtractOptions, base: OpenBase) -> "torch.dtype":
    import torch

    from sdkit.io.dtypes import CODE_TO_TORCH

    return getattr(torch, DTYPES[options.dtype]) if options.dtype else CODE_TO_TORCH[modules_dtype(base)]


def modules_dtype(base: OpenBase) -> str:
    dominant = base.identity.precision.dominant
    return dominant if dominant in ("F16", "BF16", "F32") else "F32"


# ---- resize ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResizeOptions:
    rank: int = 4
    conv_rank: int | None = None
    dynamic: str | None = None
    value: float | None = None
    base: str | None = None  # resolves names and shapes (needed for some LyCORIS modules)
    format: str = "kohya"
    dtype: str | None = None  # default: the input's

    def rule(self) -> RankRule:
        rule = RankRule(self.rank, self.conv_rank, self.dynamic, self.value)
        rule.check()
        return rule


def resize_lora(source: str | os.PathLike[str], output: str | os.PathLike[str],
                options: ResizeOptions = ResizeOptions(), *, overwrite: bool = False) -> SvdReport:
    """Write `source` re-factorised to a new (or dynamic) rank."""
    rule = options.rule()
    output = Path(output)
    check_output_path(output, (source, options.base), force=overwrite)
    report = SvdReport(str(output))
    with ExitStack() as stack:
        transformer = options.base is not None and transformer_base(options.base)
        base = open_base(options.base, stack, transformers=False) if options.base and not transformer else None
        lora, identity = open_adapter(str(source), stack)
        # transformer LoRAs are resized in kohya's names (q / k / v fused exactly)
        lora = in_kohya_layout(lora, identity, options.base if transformer else None)
        layers = group_layers([(AdapterInput(str(source)), lora)], base, report.notes)
        modules = [_resized(layer, rule, base, report) for layer in layers]
        facts = LoraFacts(identity.family, "v" if identity.prediction == "v" else "epsilon")
        inputs = (str(source),) + ((options.base,) if options.base else ())
        write_lora(output, modules, facts, Provenance("lora-resize", inputs, params_of(options)),
                   format=options.format, dtype=lora_dtype(options.dtype, [lora]), overwrite=overwrite)
    return report


def _resized(layer: Layer, rule: RankRule, base: OpenBase | None, report: SvdReport) -> ExportModule:
    module = layer.members[0].module
    export = layer.export
    if is_plain_lora(module) and len(layer.members) == 1:  # sd-scripts: factor up @ down, keep alpha / rank
        up, down = module.tensors["up"].load().float(), module.tensors["down"].load().float()
        cap = min(rule.cap_for((up.shape[0], *down.shape[1:])), module.rank or 1)
        factors = factorize_product(up, down, rule, cap=cap)  # up @ down is never formed
        alpha = module.scale * factors.rank
    else:
        delta = summed_delta(layer, base)
        factors = factorize(delta, rule)
        alpha = float(factors.rank)
    label = export.name or kohya_module_name(export, False)
    note_dropped_biases(layer, label, report.notes)
    report.add(label, factors)
    export.tensors = {"lora_up.weight": factors.up, "lora_down.weight": factors.down}
    export.alpha = alpha
    return export
