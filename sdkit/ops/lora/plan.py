"""Planning a bake: the base seen as named layers, each adapter's modules mapped onto
them, family checks, and per-key lists of what to add.

Nothing heavy happens here: the base's header, each adapter's header and its alpha
scalars are read; tensors stay on disk until the writer pulls the baked keys.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdkit.adapters.lora_format import LoraFile, LoraModule, parse_lora
from sdkit.adapters.lora_names import (ModelNames, ModuleMapping, Piece, Target, map_modules, model_names,
                                       require_some, underscore_names)
from sdkit.adapters.transformer_names import find_denoiser, transformer_names
from sdkit.arch import Identity, identify
from sdkit.arch.fingerprint import LayoutMatch
from sdkit.arch.blocks import BASE, Layout, model_block_layout
from sdkit.errors import SdkitError, with_article
from sdkit.io import ModelFile, open_model
from sdkit.ops.adapter_input import AdapterInput
from sdkit.ops.layout import ModelView, model_view
from sdkit.ops.block_weights import BlockSpec, block_setting, parse_block_spec, resolve_blocks

COMPONENT_CHOICES = {"all": ("unet", "text_encoder", "text_encoder_2", "text_encoder_3"), "unet": ("unet",),
                     "te": ("text_encoder", "text_encoder_2", "text_encoder_3")}
# families whose LoRAs fit each other's models (same architecture, other training)
_SAME_ARCHITECTURE = ({"sdxl-base", "playground-v2.5"},)
_BASE_KINDS = ("checkpoint", "unet", "text-encoder")
KOHYA_T5 = "text_encoder_3"  # the component kohya's `lora_te3_` names (T5-XXL)
# guesses from which parts an adapter touches: too weak to refuse an adapter on ("Flux
# block names" alone fit FLUX.1 and Chroma alike)
_WEAK_FAMILY_EVIDENCE = ("one text encoder", "two text encoders", "kohya SDXL block names",
                         "Flux block names")
# the weights a transformer bake reads and writes as plain values
_PLAIN_DTYPES = ("F16", "BF16", "F32")


@dataclass(frozen=True)
class Contribution:
    """One module's delta (the rows `piece` names) on one base tensor, at its final strength."""

    module: LoraModule
    strength: float
    target: Target
    piece: Piece


@dataclass
class AdapterReport:
    """What happened to one adapter's modules."""

    path: str
    strength: float
    family: str
    family_evidence: str | None
    adapter_type: str | None
    modules: int
    mapped: int = 0
    by_component: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # mapped but left out on request
    dropped_biases: list[str] = field(default_factory=list)
    family_problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "strength": self.strength, "family": self.family,
                "family_evidence": self.family_evidence, "adapter_type": self.adapter_type, "modules": self.modules, "mapped": self.mapped,
                "by_component": self.by_component, "unmapped": self.unmapped, "skipped": self.skipped,
                "dropped_biases": self.dropped_biases, "family_problem": self.family_problem}


@dataclass
class OpenBase:
    """The base model opened and indexed."""

    model: ModelFile
    identity: Identity
    view: ModelView
    names: ModelNames
    denoiser: LayoutMatch | None = None  # a transformer denoiser's layout, sizes and family

    @property
    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: lazy.shape for name, lazy in self.view.tensors.items()}


def open_base(path: str, stack: ExitStack, *, transformers: bool = True) -> OpenBase:
    """Open a model file or folder as a base for adapters (headers only). A transformer
    denoiser (FLUX, SD3, …) is indexed by its family's key map where `transformers`
    allows (the operations that read base weights per layer do not take one yet)."""
    model = stack.enter_context(open_model(path))
    identity = identify(model)
    if identity.kind not in _BASE_KINDS:
        raise SdkitError(f"{path}: is {with_article(identity.part or identity.kind)}, "
                         "not a model adapters can be applied to")
    view = model_view(model, identity)
    found = find_denoiser(model) if "transformer" in identity.components else None
    if found is not None and transformers:
        root, match = found
        names = transformer_names(view.tensors, root, match)
        packed = packed_weights(identity)
        if packed:
            names.notes.append(f"its weights are {packed}: a bake stores the weights it changes back in that "
                               "format")
        return OpenBase(model, identity, view, names, match)
    names = model_names(view.convention, view.layout, view.tensors, view.configs)
    _answer_kohya_t5_names(names, identity)
    if not names.targets:
        held = "a transformer denoiser, which this operation does not take yet" if found else "none"
        raise SdkitError(f"{path}: is {with_article(identity.part or identity.kind)}; sdkit applies adapters "
                         f"to UNet and text-encoder layers only here, and it holds {held}")
    return OpenBase(model, identity, view, names)


def _answer_kohya_t5_names(names: ModelNames, identity: Identity) -> None:
    """A T5 encoder held as another component (a lone T5-XXL file is `text_encoder`)
    answers to kohya's `lora_te3_` names too: sd-scripts and ComfyUI number T5-XXL third
    in every family."""
    for encoder in identity.facts.get("text_encoders") or ():
        component = encoder.get("component")
        if encoder.get("architecture") != "t5" or component in (None, KOHYA_T5):
            continue
        names.names.update({(KOHYA_T5, name): target for target in names.targets if target.component == component
                            for name in underscore_names(target)})


def packed_weights(identity: Identity) -> str | None:
    """The precision of fp8 / GGUF / other packed weights in words (None for plain ones)."""
    precision = identity.precision
    quantized = (precision.quantization or {}).get("scheme")
    if quantized or (precision.dominant and precision.dominant not in _PLAIN_DTYPES):
        return precision.label or quantized or precision.dominant
    return None


def open_adapter(path: str, stack: ExitStack, *, rank: int | None = None,
                 alpha: float | None = None) -> tuple[LoraFile, Identity]:
    model = stack.enter_context(open_model(path))
    identity = identify(model)
    if identity.kind != "lora":
        raise SdkitError(f"{path}: is {with_article(identity.part or identity.kind)}, not a LoRA / LyCORIS adapter")
    return parse_lora(model, default_alpha=alpha, rank_override=rank), identity


def family_problem(base: str, adapter: str) -> str | None:
    """Why an adapter made for `adapter` does not fit a `base` model (None: it fits, or
    one side is unknown and the layer shapes decide)."""
    if "unknown" in (base, adapter) or base == adapter:
        return None
    if any({base, adapter} <= group for group in _SAME_ARCHITECTURE):
        return None
    return f"made for {adapter}, the base is {base}"


def decisive_family(identity: Identity) -> str:
    """The adapter's family when metadata or layer widths say it, else "unknown" (a
    guess from which parts it touches leaves the decision to the layer shapes)."""
    evidence = identity.facts.get("family_evidence")
    return "unknown" if evidence in _WEAK_FAMILY_EVIDENCE else identity.family


def map_adapter(base: OpenBase, item: AdapterInput, lora: LoraFile,
                identity: Identity) -> tuple[AdapterReport, ModuleMapping]:
    mapping = map_modules(lora, base.names, base.bias_shapes)
    report = AdapterReport(item.path, item.strength, identity.family, identity.facts.get("family_evidence"),
                           identity.adapter_type,
                           len(lora.modules), unmapped=dict(mapping.unmapped),
                           family_problem=family_problem(base.identity.family, decisive_family(identity)))
    return report, mapping


@dataclass
class BakePlan:
    """Per base key (as the view names it), the contributions to its weight or bias."""

    base: OpenBase
    reports: list[AdapterReport]
    weights: dict[str, list[Contribution]]
    biases: dict[str, list[Contribution]]


class BlockStrengths:
    """Per-layer strength factors from `--blocks` (the diffusion model's blocks, as a merge
    names them; a UNet base's text encoders are BASE)."""

    def __init__(self, names: ModelNames, spec: BlockSpec | None, family: str | None = None) -> None:
        self.layout: Layout | None = None
        self.factors: dict[str, float] = {}
        if spec:
            ldm_keys = [t.ldm_key for t in names.targets if t.ldm_key and t.component == "unet"]
            if not ldm_keys:
                raise SdkitError("--blocks: the base's diffusion-model layers have no single-file names "
                                 "to take block ids from")
            self.layout = model_block_layout(family, ldm_keys)
            self.factors = resolve_blocks(spec, self.layout)

    def factor(self, target: Target) -> float:
        if not self.factors:
            return 1.0
        if target.component != "unet":
            return self.factors.get(BASE, 1.0)
        found = block_setting(self.factors, self.layout, target.ldm_key) if self.layout and target.ldm_key else None
        return 1.0 if found is None else found


def plan_bake(base: OpenBase, adapters: Sequence[AdapterInput], stack: ExitStack, *,
              components: str = "all", blocks: str | BlockSpec | None = None,
              rank: int | None = None, alpha: float | None = None,
              allow_family_mismatch: bool = False) -> BakePlan:
    """Map every adapter onto `base`; refuse wrong families (unless `allow_family_mismatch`) and adapters
    none of whose modules fit."""
    if not adapters:
        raise SdkitError("no adapter to bake")
    allowed = COMPONENT_CHOICES[components]
    spec = parse_block_spec(blocks) if isinstance(blocks, str) else blocks
    strengths = BlockStrengths(base.names, spec, base.identity.family)
    plan = BakePlan(base, [], {}, {})
    for item in adapters:
        lora, identity = open_adapter(item.path, stack, rank=rank, alpha=alpha)
        report, mapping = map_adapter(base, item, lora, identity)
        if report.family_problem and not allow_family_mismatch:
            raise SdkitError(f"{item.path}: {report.family_problem} "
                             "(--allow-family-mismatch bakes it anyway)")
        require_some(mapping, item.path)
        _add_contributions(plan, report, mapping, lora, item.strength, allowed, strengths)
        plan.reports.append(report)
    return plan


def _add_contributions(plan: BakePlan, report: AdapterReport, mapping: ModuleMapping, lora: LoraFile,
                       strength: float, allowed: Sequence[str], strengths: BlockStrengths) -> None:
    for name, target in mapping.mapped.items():
        if target.component not in allowed:
            report.skipped[name] = f"{target.component} left out"
            continue
        factor = strengths.factor(target)
        if factor == 0:
            report.skipped[name] = "block weight 0"
            continue
        report.mapped += 1
        report.by_component[target.component] = report.by_component.get(target.component, 0) + 1
        module = lora.modules[name]
        placements = target.placements()
        if "bias" in module.tensors and any(piece.bias is None for piece in placements):
            report.dropped_biases.append(name)
        for piece in placements:
            contribution = Contribution(module, strength * factor, target, piece)
            plan.weights.setdefault(piece.weight.key, []).append(contribution)
            if "bias" in module.tensors and piece.bias is not None:
                plan.biases.setdefault(piece.bias.key, []).append(contribution)


# ---- `sdkit lora check` ------------------------------------------------------------------

def check_adapter(base_path: str, lora_path: str, *, rank: int | None = None,
                  alpha: float | None = None) -> dict[str, Any]:
    """How an adapter fits a base: families, modules mapped per component, the others and
    why, and a verdict: every module applies, only some do, or none (the adapter would do
    nothing, or less than it was trained to, wherever it is loaded on this base)."""
    with ExitStack() as stack:
        base = open_base(base_path, stack)
        lora, identity = open_adapter(lora_path, stack, rank=rank, alpha=alpha)
        report, mapping = map_adapter(base, AdapterInput(lora_path), lora, identity)
        report.mapped = len(mapping.mapped)
        for target in mapping.mapped.values():
            report.by_component[target.component] = report.by_component.get(target.component, 0) + 1
        convention = base.denoiser.layout.convention if base.denoiser else base.view.convention
        return {"base": str(Path(base_path)), "base_family": base.identity.family,
                "base_part": base.identity.part, "base_convention": convention,
                "family_match": report.family_problem is None, "verdict": mapping_verdict(report),
                "notes": base.names.notes, **report.to_json()}


def mapping_verdict(report: AdapterReport) -> str:
    """"other-family" | "none" | "partial" | "all": whether the adapter was made for the
    base's family and how many of its modules reach the base."""
    if report.family_problem:
        return "other-family"
    if report.mapped == 0:
        return "none"
    return "all" if report.mapped == report.modules else "partial"
