"""Recognise LoRA-family adapter files and say which dialect, algorithm and base they are.

Every adapter key is `<module>.<parameter>`; the parameter names tell the algorithm
(formats.md (a): LoRA/LoCon `lora_up/lora_down`, LoHa `hada_*`, LoKr `lokr_*`, IA3
`weight`+`on_input`, full `diff`, norm `w_norm`, GLoRA `a1/a2/b1/b2`, (B)OFT `oft_blocks`,
DoRA `dora_scale` / `lora_magnitude_vector`) and the module names tell the trainer's
convention (kohya `lora_unet_*`, peft/diffusers dotted paths). The base family comes from
metadata, else from the width the adapter expects at the cross-attention `to_k`/`to_v`
(InvokeAI `lora_token_vector_length`) and at the text encoders, else from structure.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sdkit.arch.families import FAMILIES, FAMILY_BY_CONTEXT_DIM
from sdkit.arch.hygiene import precision_of
from sdkit.arch.identity import Identity
from sdkit.arch.metadata import MetadataHints
from sdkit.io.model_file import ModelFile
from sdkit.io.safetensors_json import metadata_json

# (parameter suffix, algorithm, role); "" algorithm = shared bookkeeping (alpha, scale)
_PARAMETERS: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "lora", "down"), (".lora_linear_layer.up.weight", "lora", "up"),
    (".lora_A.default.weight", "lora", "down"), (".lora_B.default.weight", "lora", "up"),
    ("_lora.down.weight", "lora", "down"), ("_lora.up.weight", "lora", "up"),
    (".lora.down.weight", "lora", "down"), (".lora.up.weight", "lora", "up"),
    (".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"),
    (".lora_mid.weight", "lora", "mid"),
    (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up"), (".lora_B.bias", "lora", "up_bias"),
    (".lora_A", "lora", "down"), (".lora_B", "lora", "up"),
    (".lora_magnitude_vector.weight", "dora", "magnitude"), (".lora_magnitude_vector", "dora", "magnitude"),
    (".dora_scale", "dora", "magnitude"),
    (".hada_w1_a", "loha", "w1_a"), (".hada_w1_b", "loha", "w1_b"), (".hada_w2_a", "loha", "w2_a"),
    (".hada_w2_b", "loha", "w2_b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1_a", "lokr", "w1_a"), (".lokr_w1_b", "lokr", "w1_b"), (".lokr_w2_a", "lokr", "w2_a"),
    (".lokr_w2_b", "lokr", "w2_b"), (".lokr_w1", "lokr", "w1"), (".lokr_w2", "lokr", "w2"),
    (".lokr_t2", "lokr", "t2"),
    (".oft_blocks", "oft", "blocks"), (".oft_diag", "oft", "blocks"),
    (".a1.weight", "glora", "a1"), (".a2.weight", "glora", "a2"), (".b1.weight", "glora", "b1"),
    (".b2.weight", "glora", "b2"), (".bm.weight", "glora", "bm"),
    (".diff_b", "full", "bias"), (".diff", "full", "weight"), (".set_weight", "full", "set"),
    (".w_norm", "norm", "weight"), (".b_norm", "norm", "bias"),
    (".on_input", "ia3", "on_input"), (".ia3_l", "ia3", "weight"),
    (".alpha", "", "alpha"), (".scale", "", "scale"), (".rescale", "", "rescale"),
    (".reshape_weight", "", "reshape"),
)
_SUFFIXES = tuple(suffix for suffix, _, _ in _PARAMETERS)
_KOHYA_PREFIXES = (  # module-name prefix -> component ("" = decide from the path)
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"), ("lycoris_", ""),
)
_KOHYA_NAME_STARTS = tuple(prefix for prefix, _ in _KOHYA_PREFIXES)
_DOTTED_PREFIXES = (  # diffusers / peft pipeline-level prefixes
    ("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"), ("transformer.", "transformer"),
    ("base_model.model.", ""), ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
)
# algorithms only LyCORIS writes under kohya names (kohya's own networks write lora/locon/dylora/oft)
_LYCORIS_ONLY = frozenset({"loha", "lokr", "ia3", "full", "glora", "norm", "boft", "dora"})
# a module on one of these layers is a ResBlock / sampler conv: LoCon territory
_CONV_LAYER = re.compile(r"resnets|samplers|in_layers|out_layers|emb_layers|skip_connection|"
                         r"conv_in|conv_out|conv_shortcut|_op$|\.op$")
_TEXT_PATH = re.compile(r"text_model|encoder[._]layers|self_attn|mlp[._]fc|final_layer_norm")
_TRANSFORMER_PATH = re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks|joint_blocks|"
                               r"transformer_blocks)[._]")
_LDM_UNET_PATH = re.compile(r"^(input_blocks|middle_block|output_blocks)[._]")
_CROSS_ATTN_KV = re.compile(r"attn2_(processor_)?to_[kv]$")
_TEXT_ATTN = re.compile(r"self_attn_[qkv]_proj$")
_FLUX_PATH = re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks)[._]")
# layers only one relative of FLUX.1 has (module paths, `.` or `_` separated)
_RADIANCE_PATH = re.compile(r"^(nerf_blocks|nerf_image_embedder|nerf_final_layer|img_in_patch)[._]")
_CHROMA_PATH = re.compile(r"^distilled_guidance_layer[._]")
_FLUX2_PATH = re.compile(r"(^|[._])(double_stream_modulation|single_stream_modulation)[._]|"
                         r"to_qkv_mlp_proj$|(^|[._])ff(_context)?[._]linear_(in|out)$|"
                         r"^single_transformer_blocks[._]\d+[._]attn[._]to_out$")
_FLUX1_MODULATION = re.compile(r"(^|[._])(img_mod|txt_mod|modulation)[._]lin$|norm1(_context)?[._]linear$|"
                               r"^single_transformer_blocks[._]\d+[._]norm[._]linear$|"
                               r"^(time_in|vector_in|guidance_in|time_text_embed)[._]")
# where the MLP shows the design: output / input of the first MLP layer (FLUX.1 GELU 4x,
# FLUX.2 SwiGLU 2 x 3x), of a single block's fused QKV + MLP (3 + 4, 3 + 6); input / output
# of its second layer (1 + 4, 1 + 3)
_MLP_IN = re.compile(r"(img_mlp|txt_mlp)[._]0$|ff(_context)?[._]net[._]0[._]proj$|[._]proj_mlp$")
_LINEAR1 = re.compile(r"^single_blocks[._]\d+[._]linear1$")
_LINEAR2 = re.compile(r"^single_blocks[._]\d+[._]linear2$")
# transformer attention inputs: their width is the hidden size (Flux 3072, SD3 1536 / 2432,
# FLUX.2-dev 6144)
_TRANSFORMER_ATTN = re.compile(r"(attn_to_[qkv]|attn_qkv)$")
_FAMILY_BY_HIDDEN = {3072: "flux", 1536: "sd3", 2432: "sd3", 6144: "flux2"}
# hidden sizes of FLUX.2 (dev, Klein 9B) that no FLUX.1-design model has
_FLUX2_ONLY_HIDDEN = (6144, 4096)
_COMPONENT_ORDER = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Module:
    """One adapted layer: its parameters' shapes by role."""

    name: str
    component: str
    path: str  # name inside the component, prefix removed
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    algorithms: set[str] = field(default_factory=set)


@dataclass
class LoraScan:
    modules: dict[str, Module]
    adapter_keys: int  # keys that belong to an adapter module
    kohya_named: bool


def parse_parameter(key: str) -> tuple[str, str, str] | None:
    """(module, algorithm, role) of an adapter key, or None for any other key."""
    if not key.endswith(_SUFFIXES):  # one call rules out a checkpoint's keys, most of them
        return None
    for suffix, algorithm, role in _PARAMETERS:
        if key.endswith(suffix):
            return key[: -len(suffix)], algorithm, role
    return None


def scan_lora(model: ModelFile) -> LoraScan:
    """Group the keys of `model` into adapter modules."""
    modules: dict[str, Module] = {}
    for key, info in model.infos.items():
        parsed = parse_parameter(key)
        if parsed is None:
            continue
        name, algorithm, role = parsed
        module = modules.get(name)
        if module is None:
            component, path = split_component(name)
            module = modules[name] = Module(name, component, path)
        module.params[role] = info.shape
        if algorithm:
            module.algorithms.add(algorithm)
    _attach_ia3_weights(model, modules)
    adapted = [m for m in modules.values() if m.algorithms]
    kohya_named = any(m.name.startswith(_KOHYA_NAME_STARTS) for m in adapted)
    return LoraScan(modules, sum(len(m.params) for m in adapted), kohya_named)


def _attach_ia3_weights(model: ModelFile, modules: dict[str, Module]) -> None:
    # LyCORIS IA3 stores a plain `<module>.weight` beside `<module>.on_input`
    for module in modules.values():
        if "on_input" in module.params and module.name + ".weight" in model.infos:
            module.params["weight"] = model.infos[module.name + ".weight"].shape


def is_lora_file(model: ModelFile, scan: LoraScan) -> bool:
    """Adapter keys are most of the file (merged checkpoints may carry a few stray ones)."""
    real_modules = any(m.algorithms for m in scan.modules.values())
    return real_modules and scan.adapter_keys * 2 > len(model.infos)


def split_component(module: str) -> tuple[str, str]:
    """(diffusers component, path inside it) of an adapter module name."""
    for prefix, component in _KOHYA_PREFIXES + _DOTTED_PREFIXES:
        if module.startswith(prefix):
            path = module[len(prefix):]
            if not component or (component == "unet" and _TRANSFORMER_PATH.match(path)):
                component = _component_from_path(path)  # kohya names Flux blocks lora_unet_ too
            return component, path
    return _component_from_path(module), module


def _component_from_path(path: str) -> str:
    if _TRANSFORMER_PATH.match(path):
        return "transformer"
    if _TEXT_PATH.search(path):
        return "text_encoder"
    return "unet"


def module_algorithm(module: Module) -> str:
    """The algorithm name of one module (lora and locon told apart by its layer)."""
    algorithms = module.algorithms - {"dora"}
    if not algorithms:
        return "dora" if module.algorithms else "unknown"
    algorithm = sorted(algorithms)[0]
    if algorithm == "oft":
        blocks = module.params.get("blocks", ())
        return "boft" if len(blocks) == 4 else "oft"
    if algorithm == "lora":
        return "locon" if _is_conv_module(module) else "lora"
    return algorithm


def _is_conv_module(module: Module) -> bool:
    down = module.params.get("down", ())
    spatial_kernel = len(down) == 4 and tuple(down[2:]) != (1, 1)
    return spatial_kernel or "mid" in module.params or bool(_CONV_LAYER.search(module.path))


def _dim(params: dict[str, tuple[int, ...]], role: str, index: int) -> int | None:
    shape = params.get(role)
    return shape[index] if shape is not None and len(shape) >= 2 else None


def rank_of(module: Module) -> int | None:
    p = module.params
    for role in ("down", "w1_b", "w2_b", "a2"):  # lora / loha / lokr / glora factor rows
        if _dim(p, role, 0):
            return _dim(p, role, 0)
    return None


def in_features(module: Module) -> int | None:
    """Input width of the adapted layer, where the parameters reveal it."""
    p = module.params
    if "down" in p:
        return _dim(p, "down", 1)
    if "w1_b" in p and "t1" not in p:
        return _dim(p, "w1_b", 1)
    if "a1" in p:
        return _dim(p, "a1", 0)
    if "full" in module.algorithms:
        return _dim(p, "weight", 1)
    return _lokr_in_features(p)


def out_features(module: Module) -> int | None:
    """Output width of the adapted layer, where the parameters reveal it."""
    p = module.params
    if "up" in p:
        return _dim(p, "up", 0)
    if "full" in module.algorithms:
        return _dim(p, "weight", 0)
    if "lokr" in module.algorithms:  # the Kronecker product of the two factors
        left, right = p.get("w1") or p.get("w1_a"), p.get("w2") or p.get("w2_a")
        if left and right and len(left) == 2 and len(right) == 2:
            return left[0] * right[0]
        return None
    if "w1_a" in p and "t1" not in p:  # LoHa
        return _dim(p, "w1_a", 0)
    return None


def _lokr_in_features(p: dict[str, tuple[int, ...]]) -> int | None:
    left = p.get("w1") or p.get("w1_b")
    right = p.get("w2") or p.get("w2_b")
    if not left or not right or len(left) != 2 or len(right) != 2:
        return None
    return left[1] * right[1]


def key_convention(scan: LoraScan, algorithms: set[str], network_module: str) -> str:
    """kohya | lycoris | peft | ldm, from the names and the algorithms present."""
    if scan.kohya_named:
        if network_module.startswith("networks."):
            return "kohya"
        lycoris_named = any(name.startswith("lycoris_") for name in scan.modules)
        if network_module.startswith("lycoris") or lycoris_named or algorithms & _LYCORIS_ONLY:
            return "lycoris"
        return "kohya"
    if any(_LDM_UNET_PATH.match(m.path) for m in scan.modules.values()):
        return "ldm"
    return "peft"


def dominant_adapter_type(counts: Counter[str], modules: list[Module], declared: str) -> str:
    """The adapter type of the file: the most common algorithm, LoRA refined to dylora
    (declared by `ss_network_module` / `algo`), dora (magnitude vectors) or locon (conv layers)."""
    grouped: Counter[str] = Counter()
    for algorithm, n in counts.items():
        grouped["lora" if algorithm in ("lora", "locon") else algorithm] += n
    top = max(grouped, key=lambda a: (grouped[a], a == "lora"))
    if top != "lora":
        return top
    if "dylora" in declared:
        return "dylora"
    if any("dora" in m.algorithms for m in modules):
        return "dora"
    return "locon" if counts.get("locon") else "lora"


def context_widths(modules: list[Module]) -> Counter[int]:
    """Cross-attention key/value input widths (= text context width) seen in UNet modules."""
    widths: Counter[int] = Counter()
    for module in modules:
        flat = module.path.replace(".", "_")
        if module.component == "unet" and _CROSS_ATTN_KV.search(flat):
            width = in_features(module)
            if width:
                widths[width] += 1
    return widths


def text_encoder_widths(modules: list[Module]) -> dict[str, int]:
    """Hidden width of each text encoder, from its self-attention q/k/v inputs."""
    widths: dict[str, int] = {}
    for module in modules:
        if module.component.startswith("text_encoder") and module.component not in widths:
            if _TEXT_ATTN.search(module.path.replace(".", "_")):
                width = in_features(module)
                if width:
                    widths[module.component] = width
    return widths


def modules_by_component(modules: list[Module]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for module in modules:
        counts[module.component] += 1
    return dict(counts)


def identify_lora(model: ModelFile, scan: LoraScan, hints: MetadataHints) -> Identity:
    modules = [m for m in scan.modules.values() if m.algorithms]
    counts = Counter(module_algorithm(m) for m in modules)
    network_module = model.metadata.get("ss_network_module", "")
    declared = f"{network_module} {_declared_algorithm(model.metadata)}"
    has_dora = any("dora" in m.algorithms for m in modules)
    components = [c for c in _COMPONENT_ORDER if any(m.component == c for m in modules)]
    context = context_widths(modules)
    te_widths = text_encoder_widths(modules)
    family, evidence = _lora_family(hints, modules, components, context, te_widths, scan.kohya_named)
    mismatches = _lora_mismatches(family, context, te_widths)
    identity = Identity(
        kind="lora", family=family,
        adapter_type=dominant_adapter_type(counts, modules, declared),
        key_convention=key_convention(scan, set(counts) | ({"dora"} if has_dora else set()),
                                      network_module),
        components=components, nonstandard=bool(mismatches),
    )
    if hints.prediction:
        identity.prediction, identity.prediction_evidence = hints.prediction, hints.prediction_source
    identity.variant = hints.variant or "normal"  # an adapter's variant is its base model's
    identity.precision = precision_of(model, _component_of_key)
    ranks = sorted({r for r in map(rank_of, modules) if r is not None})
    alphas = _alpha_values(model, scan)
    identity.facts.update({
        "lora_modules": len(modules), "modules_by_component": modules_by_component(modules),
        "adapter_types": dict(sorted(counts.items())), "lora_rank": ranks, "lora_alpha": alphas,
        "conv_modules": counts.get("locon", 0), "dora": has_dora, "family_evidence": evidence,
    })
    if context:
        identity.facts["context_dim"] = context.most_common(1)[0][0]
    if te_widths:
        identity.facts["text_encoder_widths"] = te_widths
    identity.notes.append(_summary_note(modules, counts, ranks, alphas))
    if mismatches:
        identity.notes.append("non-standard dimensions: " + "; ".join(mismatches))
    return identity


def _declared_algorithm(metadata: dict[str, str]) -> str:
    """The `algo` of kohya `ss_network_args` (LyCORIS trainings record it there)."""
    args = metadata_json(metadata.get("ss_network_args"))
    return str(args.get("algo", "")) if isinstance(args, dict) else ""


def _component_of_key(key: str) -> str:
    parsed = parse_parameter(key)
    module = parsed[0] if parsed else key.rsplit(".", 1)[0]  # IA3 keeps a bare `.weight`
    return split_component(module)[0]


def _lora_family(hints: MetadataHints, modules: list[Module], components: list[str],
                 context: Counter[int], te_widths: dict[str, int],
                 kohya_named: bool) -> tuple[str, str | None]:
    """(family, what decided it): metadata, then widths, then structure."""
    if hints.family:
        return hints.family, hints.family_source
    if any(_FLUX_PATH.match(m.path) or _RADIANCE_PATH.match(m.path) or _CHROMA_PATH.match(m.path)
           or _FLUX2_PATH.search(m.path) for m in modules):
        return _flux_relative(modules)
    if any(m.path.startswith("joint_blocks") for m in modules):
        return "sd3", "MMDiT block names"
    hidden = _transformer_width(modules)
    if hidden in _FAMILY_BY_HIDDEN:
        return _FAMILY_BY_HIDDEN[hidden], f"transformer width {hidden}"
    if context:
        width = context.most_common(1)[0][0]
        if width in FAMILY_BY_CONTEXT_DIM:
            return FAMILY_BY_CONTEXT_DIM[width], f"cross-attention width {width}"
    if "text_encoder_2" in components:
        return "sdxl-base", "two text encoders"
    te_width = te_widths.get("text_encoder")
    if te_width in (768, 1024):
        return ("sd1" if te_width == 768 else "sd2"), f"text encoder width {te_width}"
    if kohya_named and any(_LDM_UNET_PATH.match(m.path) for m in modules):
        return "sdxl-base", "kohya SDXL block names"
    if "text_encoder" in components:
        return "sd1", "one text encoder"
    return "unknown", None


def _flux_relative(modules: list[Module]) -> tuple[str, str]:
    """Which of FLUX.1, FLUX.2, Chroma and Chroma Radiance an adapter on Flux-style blocks
    was made for: by the layers only one of them has, then by the MLP widths (FLUX.2's
    SwiGLU), then by the hidden size. An adapter on attention and MLP only fits FLUX.1 and
    Chroma alike: FLUX.1 is said, on evidence too weak to refuse it for Chroma."""
    paths = [m.path for m in modules]
    if any(_RADIANCE_PATH.match(p) for p in paths):
        return "chroma-radiance", "Chroma Radiance NeRF head names"
    if any(_CHROMA_PATH.match(p) for p in paths):
        return "chroma", "Chroma approximator names"
    if any(_FLUX2_PATH.search(p) for p in paths):
        return "flux2", "FLUX.2 layer names"
    design = _flux_design(modules)
    if design:
        return design
    if any(_FLUX1_MODULATION.search(p) for p in paths):
        return "flux", "FLUX.1 modulation layer names"
    return "flux", "Flux block names"


def _flux_design(modules: list[Module]) -> tuple[str, str] | None:
    """FLUX.2 (or FLUX.1's design) from the MLP width ratios, else FLUX.2 from a hidden size
    FLUX.1's design never has; None when the adapted layers show neither."""
    for module in modules:
        width_in, width_out = in_features(module), out_features(module)
        if not width_in or not width_out:
            continue
        for pattern, ratio, flux1, flux2 in ((_MLP_IN, width_out / width_in, 4, 6),
                                             (_LINEAR1, width_out / width_in, 7, 9),
                                             (_LINEAR2, width_in / width_out, 5, 4)):
            if pattern.search(module.path):
                if ratio == flux2:
                    return "flux2", "FLUX.2 MLP widths"
                if ratio == flux1:
                    return None
    hidden = _flux_hidden(modules)
    if hidden in _FLUX2_ONLY_HIDDEN:
        return "flux2", f"transformer width {hidden}"
    return None


def _flux_hidden(modules: list[Module]) -> int | None:
    for module in modules:
        flat = module.path.replace(".", "_")
        if _FLUX_PATH.match(flat) and (flat.endswith("attn_qkv") or _TRANSFORMER_ATTN.search(flat)):
            return in_features(module)
    return None


def _transformer_width(modules: list[Module]) -> int | None:
    for module in modules:
        if module.component == "transformer" and _TRANSFORMER_ATTN.search(module.path.replace(".", "_")):
            return in_features(module)
    return None


def _lora_mismatches(family: str, context: Counter[int], te_widths: dict[str, int]) -> list[str]:
    width = context.most_common(1)[0][0] if context else None
    ref = FAMILIES.get(family)
    if ref is None:
        if width is not None and width not in FAMILY_BY_CONTEXT_DIM:
            return [f"cross-attention width {width} matches no known family"]
        return []
    found = []
    if width is not None and width != ref.context_dim:
        found.append(f"cross-attention width {width} ({family} has {ref.context_dim})")
    for spec in ref.text_encoders:
        te_width = te_widths.get(spec.component)
        if te_width is not None and te_width != spec.width:
            found.append(f"{spec.component} width {te_width} ({family} has {spec.width})")
    return found


def _alpha_values(model: ModelFile, scan: LoraScan) -> list[float]:
    values = set()
    for module in scan.modules.values():
        if "alpha" in module.params and module.algorithms:
            tensor = model.load(module.name + ".alpha")
            values.add(round(float(tensor.reshape(-1)[0]), 6))
    return sorted(values)


def _summary_note(modules: list[Module], counts: Counter[str], ranks: list[int],
                  alphas: list[float]) -> str:
    per_component = ", ".join(f"{c} {n}" for c, n in modules_by_component(modules).items())
    parts = [f"{len(modules)} adapted modules ({per_component})"]
    if len(counts) > 1:
        parts.append("types " + ", ".join(f"{a} {n}" for a, n in counts.most_common()))
    if ranks:
        parts.append("rank " + "/".join(map(str, ranks)))
    if alphas:
        parts.append("alpha " + "/".join(f"{a:g}" for a in alphas))
    return "; ".join(parts)
