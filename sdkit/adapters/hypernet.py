"""A1111 hypernetworks: read, build, create and write the `.pt` files the webui uses.

A hypernetwork holds, for each attention context width it was made for, two small MLPs:
one transforms the context fed to `to_k`, the other the context fed to `to_v`, as
`h(x) = x + mlp(x) * strength` (research: formats.md (d); A1111
`modules/hypernetworks/hypernetwork.py`).

The file is `torch.save` of `{<width>: (sd_k, sd_v), "layer_structure": [...], ...}`.
The pickle reader flattens it to tensors `<width>.<0|1>.linear.<i>.weight|bias` (older files
say `linear1` / `linear2`) and the settings to `extra`. Each MLP is an `nn.Sequential`
built exactly as A1111 builds it, because the module indices in the keys depend on it:
for each pair of neighbouring entries of `layer_structure`, a Linear, then the activation
(none for "linear", and none after the last Linear unless `activate_output`), then a
LayerNorm if `is_layer_norm`, then a Dropout where `dropout_structure` is non-zero.
Modules are float32 whatever the file stores, as in A1111.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sdkit.arch.hypernetwork_detect import is_hypernetwork, shown_setting
from sdkit.errors import SdkitError
from sdkit.io import ModelFile, open_model
from sdkit.io.output_path import write_file_atomically

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
_KEY = re.compile(r"^(\d+)\.([01])\.(.+)$")
_OLD_KEYS = {"linear1.": "linear.0.", "linear2.": "linear.1."}  # A1111 fix_old_state_dict
_LAST_LAYER_DROPOUT = 0.3  # what A1111 uses when only use_dropout flags are stored
_FLOAT32_PER_STORED_BYTE = 4  # float32 modules over one-byte tensors, the densest storage
_SLACK_BYTES = 1 << 20


def activation_classes() -> dict[str, type[nn.Module]]:
    """A1111's activation names: its named few, then every `torch.nn` activation class by
    lowercase name ("swish" is Hardswish there, not SiLU)."""
    named: dict[str, type[nn.Module]] = {
        "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    module = nn.modules.activation
    named.update({name.lower(): cls for name, cls in inspect.getmembers(module, inspect.isclass)
                  if cls.__module__ == module.__name__})
    return named


@dataclass(frozen=True)
class HypernetworkSettings:
    """How the MLPs are built; defaults are those of a newly created A1111 hypernetwork."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = "linear"
    add_layer_norm: bool = False
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] | None = None  # None: derived from the flags
    last_layer_dropout: bool = False
    weight_init: str = "Normal"

    def dropouts(self) -> tuple[float, ...]:
        """Dropout probability after each layer_structure entry (A1111 parse_dropout_structure)."""
        if self.dropout_structure is not None:
            return self.dropout_structure
        size = len(self.layer_structure)
        if not self.use_dropout:
            return (0.0,) * size
        last = _LAST_LAYER_DROPOUT if self.last_layer_dropout else 0.0
        return (0.0,) + (_LAST_LAYER_DROPOUT,) * (size - 3) + (last, 0.0)


class HypernetworkModule(nn.Module):
    """One MLP of a hypernetwork: `forward(x, strength) = x + linear(x) * strength`.

    While training the strength is 1, as in A1111.
    """

    def __init__(self, width: int, settings: HypernetworkSettings) -> None:
        super().__init__()
        self.width = width
        self.linear = nn.Sequential(*_layers(width, settings))

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        dtype = self.linear[0].weight.dtype
        inner = x.to(dtype)
        out = inner + self.linear(inner) * (1.0 if self.training else strength)
        return out.to(x.dtype)


def _layers(width: int, settings: HypernetworkSettings) -> Iterator[nn.Module]:
    activation = _activation_class(settings.activation_func)
    for kind, inputs, outputs, dropout in _layer_plan(width, settings):
        if kind == "linear":
            yield nn.Linear(inputs, outputs)
        elif kind == "activation":
            yield activation()  # type: ignore[misc]
        elif kind == "norm":
            yield nn.LayerNorm(outputs)
        else:
            yield nn.Dropout(p=dropout)


def _layer_plan(width: int, settings: HypernetworkSettings) -> list[tuple[str, int, int, float]]:
    """(kind, inputs, outputs, dropout) of each module of the `nn.Sequential`, in order:
    what `_layers` builds, known before anything is allocated."""
    structure = settings.layer_structure
    activated = settings.activation_func not in (None, "linear")
    dropouts = settings.dropouts()
    last = len(structure) - 2
    plan = []
    for index in range(len(structure) - 1):
        inputs, outputs = _size(width, structure[index]), _size(width, structure[index + 1])
        plan.append(("linear", inputs, outputs, 0.0))
        if activated and (index < last or settings.activate_output):
            plan.append(("activation", outputs, outputs, 0.0))
        if settings.add_layer_norm:
            plan.append(("norm", outputs, outputs, 0.0))
        if dropouts[index + 1] > 0:
            plan.append(("dropout", outputs, outputs, dropouts[index + 1]))
    return plan


def _size(width: int, multiplier: float) -> int:
    """A1111's `int(width * multiplier)`, refused where a file's numbers make no size."""
    try:
        return int(width * multiplier)
    except (OverflowError, ValueError):  # inf, nan, or an int too large for a float
        raise SdkitError(f"layer_structure multiplier {multiplier} times width {width} "
                         "is not a layer size") from None


def parameter_shapes(width: int, settings: HypernetworkSettings) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of `HypernetworkModule(width, settings)`, computed without
    building it (a file's settings could ask for terabytes)."""
    activation = _activation_class(settings.activation_func)
    # activations are width-independent (PReLU() holds one weight): build one to see
    activation_shapes = {} if activation is None else {
        key: tuple(tensor.shape) for key, tensor in activation().state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (kind, inputs, outputs, _) in enumerate(_layer_plan(width, settings)):
        prefix = f"linear.{index}."
        if kind == "linear":
            shapes.update({prefix + "weight": (outputs, inputs), prefix + "bias": (outputs,)})
        elif kind == "norm":
            shapes.update({prefix + "weight": (outputs,), prefix + "bias": (outputs,)})
        elif kind == "activation":
            shapes.update({prefix + key: shape for key, shape in activation_shapes.items()})
    return shapes


def _activation_class(name: str | None) -> type[nn.Module] | None:
    if name is None or name == "linear":
        return None
    found = activation_classes().get(name)
    if found is None:
        raise SdkitError(f"unknown hypernetwork activation {name!r} (A1111 knows linear, relu, "
                         "leakyrelu, elu, swish, tanh, sigmoid and torch.nn activations by "
                         "lowercase name)")
    try:
        found()  # A1111 builds activations without arguments; some classes need them
    except TypeError:
        raise SdkitError(f"hypernetwork activation {name!r} cannot be built without arguments") from None
    return found


@dataclass
class Hypernetwork:
    """An A1111 hypernetwork: a (key MLP, value MLP) pair per context width."""

    name: str
    settings: HypernetworkSettings
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.layers)

    def modules(self) -> Iterator[HypernetworkModule]:
        for pair in self.layers.values():
            yield from pair

    def parameters(self) -> list[nn.Parameter]:
        return [parameter for module in self.modules() for parameter in module.parameters()]

    @property
    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def train(self, mode: bool = True) -> "Hypernetwork":
        for module in self.modules():
            module.train(mode)
            module.requires_grad_(mode)
        return self

    def eval(self) -> "Hypernetwork":
        return self.train(False)

    def to(self, device: torch.device | str) -> "Hypernetwork":
        for module in self.modules():
            module.to(device)
        return self


def new_hypernetwork(name: str, sizes: Sequence[int], settings: HypernetworkSettings = HypernetworkSettings(),
                     generator: torch.Generator | None = None) -> Hypernetwork:
    """A fresh hypernetwork initialised as A1111 initialises one (settings.weight_init)."""
    _check_settings(Path(name), settings)
    layers = {}
    for width in sizes:
        layers[int(width)] = (_initialised(int(width), settings, generator),
                              _initialised(int(width), settings, generator))
    return Hypernetwork(name, settings, layers).eval()


def _initialised(width: int, settings: HypernetworkSettings,
                 generator: torch.Generator | None) -> HypernetworkModule:
    module = HypernetworkModule(width, settings)
    relu = "leaky_relu" if settings.activation_func == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in module.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            weight, bias = layer.weight, layer.bias
            init = "Normal" if type(layer) is nn.LayerNorm else settings.weight_init
            if init == "Normal":  # LayerNorms too: A1111 does so
                nn.init.normal_(weight, 0.0, 0.01, generator=generator)
            elif init == "XavierUniform":
                nn.init.xavier_uniform_(weight, generator=generator)
            elif init == "XavierNormal":
                nn.init.xavier_normal_(weight, generator=generator)
            elif init == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=relu, generator=generator)
            else:
                nn.init.kaiming_normal_(weight, nonlinearity=relu, generator=generator)
            nn.init.zeros_(bias)
    return module


# --------------------------------------------------------------------------- reading


def read_hypernetwork(path: str | os.PathLike[str]) -> Hypernetwork:
    """Read an A1111 hypernetwork `.pt` into float32 torch modules (eval mode)."""
    with open_model(path) as model:
        return hypernetwork_from_model(model)


def hypernetwork_from_model(model: ModelFile) -> Hypernetwork:
    if not is_hypernetwork(model):
        names = ", ".join(list(model.infos)[:4]) or "no tensors"
        raise SdkitError(f"{model.path}: not an A1111 hypernetwork (tensors: {names})")
    settings = settings_from_extra(model.path, model.extra)
    names = _module_tensor_names(model)
    for width, pair in sorted(names.items()):  # every shape checked before anything is built
        if set(pair) != {0, 1}:
            raise SdkitError(f"{model.path}: width {width} lacks its "
                             f"{'value' if 0 in pair else 'key'} module")
        for which, role in ((0, "key"), (1, "value")):
            _check_shapes(model, width, role, pair[which], settings)
    _check_stored_sizes(model)
    layers = {width: (_loaded(model, width, pair[0], settings), _loaded(model, width, pair[1], settings))
              for width, pair in sorted(names.items())}
    return Hypernetwork(
        name=_text(model.extra.get("name")) or model.path.stem, settings=settings, layers=layers,
        step=_integer(model.extra.get("step")) or 0,
        sd_checkpoint=_text(model.extra.get("sd_checkpoint")),
        sd_checkpoint_name=_text(model.extra.get("sd_checkpoint_name")),
        optional_info=_text(model.extra.get("optional_info")), path=model.path).eval()


def settings_from_extra(path: Path, extra: Mapping[str, Any]) -> HypernetworkSettings:
    """Settings as A1111's `Hypernetwork.load` reads them, with its defaults."""
    structure = extra.get("layer_structure")
    dropouts = extra.get("dropout_structure")
    settings = HypernetworkSettings(
        layer_structure=_numbers(path, "layer_structure", structure) if structure is not None else (1, 2, 1),
        activation_func=_optional_text(path, "activation_func", extra.get("activation_func")),
        add_layer_norm=bool(extra.get("is_layer_norm", False)),
        activate_output=bool(extra.get("activate_output", True)),
        use_dropout=bool(extra.get("use_dropout", False)),
        dropout_structure=_numbers(path, "dropout_structure", dropouts) if dropouts is not None else None,
        last_layer_dropout=bool(extra.get("last_layer_dropout", False)),
        weight_init=_text(extra.get("weight_initialization")) or "Normal")
    if settings.dropout_structure is not None and any(settings.dropout_structure):
        settings = replace(settings, use_dropout=True)
    _check_settings(path, settings)
    return settings


def _check_settings(path: Path, settings: HypernetworkSettings) -> None:
    structure = settings.layer_structure
    if (len(structure) < 2 or structure[0] != 1 or structure[-1] != 1
            or not all(0 < m < math.inf for m in structure)):
        raise SdkitError(f"{path}: layer_structure {shown_setting(structure)} must start and end "
                         "with 1 and hold positive finite multipliers")
    dropouts = settings.dropouts()
    if len(dropouts) < len(structure) or not all(0 <= p < 1 for p in dropouts):
        raise SdkitError(f"{path}: dropout_structure {shown_setting(dropouts)} needs one probability "
                         f"in [0, 1) per layer_structure entry ({len(structure)})")
    if settings.weight_init not in WEIGHT_INITS:
        raise SdkitError(f"{path}: unknown weight_initialization {settings.weight_init!r} "
                         f"(one of {', '.join(WEIGHT_INITS)})")
    try:
        _activation_class(settings.activation_func)
    except SdkitError as exc:
        raise SdkitError(f"{path}: {exc}") from None


def _module_tensor_names(model: ModelFile) -> dict[int, dict[int, dict[str, str]]]:
    """width -> {0: key-module names, 1: value-module names}, each as
    {state dict key (old names renamed): tensor name in the file}."""
    found: dict[int, dict[int, dict[str, str]]] = {}
    for name in model.infos:
        width, which, key = _KEY.match(name).groups()  # type: ignore[union-attr]
        for old, new in _OLD_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        found.setdefault(int(width), {}).setdefault(int(which), {})[key] = name
    return found


def _check_shapes(model: ModelFile, width: int, role: str, names: dict[str, str],
                  settings: HypernetworkSettings) -> None:
    """The file's tensors must be exactly the module's parameters, shapes included."""
    try:
        expected = parameter_shapes(width, settings)
    except SdkitError as exc:
        raise SdkitError(f"{model.path}: {exc}") from None
    present = {key: model.infos[name].shape for key, name in names.items()}
    problems = sorted(expected.keys() ^ present.keys()) + sorted(
        key for key in expected.keys() & present.keys() if expected[key] != present[key])
    if problems:
        raise SdkitError(f"{model.path}: width {width} {role} module does not match "
                         f"layer_structure {shown_setting(settings.layer_structure)} with these "
                         f"settings (differs at {', '.join(problems[:3])})")


def _check_stored_sizes(model: ModelFile) -> None:
    """The float32 modules may take a few times the file, not more: a pickle can describe
    a huge tensor over one shared element (a stride of 0), which building would expand."""
    needed = 4 * sum(info.numel for info in model.infos.values())
    allowed = _FLOAT32_PER_STORED_BYTE * model.size_bytes + _SLACK_BYTES
    if needed > allowed:
        raise SdkitError(f"{model.path}: its modules would take {needed:,} bytes in float32 "
                         f"from a file of {model.size_bytes:,} bytes: its tensors are not "
                         "stored at their size")


def _loaded(model: ModelFile, width: int, names: dict[str, str],
            settings: HypernetworkSettings) -> HypernetworkModule:
    module = HypernetworkModule(width, settings)  # as large as the file's own tensors
    module.load_state_dict({key: model.load(name) for key, name in names.items()})
    return module  # float32 parameters whatever the file stores, as in A1111


def _numbers(path: Path, what: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SdkitError(f"{path}: {what} {value!r} is not a list of numbers")
    return tuple(value)


def _optional_text(path: Path, what: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SdkitError(f"{path}: {what} {value!r} is not a name")
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value) or None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- writing


def hypernetwork_object(hn: Hypernetwork) -> dict[Any, Any]:
    """The dict A1111's `Hypernetwork.save` pickles, with CPU tensors."""
    settings = hn.settings
    dropouts = list(settings.dropouts())
    saved: dict[Any, Any] = {
        width: tuple(_plain_state(module) for module in pair) for width, pair in sorted(hn.layers.items())}
    saved.update({
        "step": hn.step, "name": hn.name, "layer_structure": list(settings.layer_structure),
        "activation_func": settings.activation_func, "is_layer_norm": settings.add_layer_norm,
        "weight_initialization": settings.weight_init, "sd_checkpoint": hn.sd_checkpoint,
        "sd_checkpoint_name": hn.sd_checkpoint_name, "activate_output": settings.activate_output,
        "use_dropout": settings.use_dropout or any(dropouts), "dropout_structure": dropouts,
        "last_layer_dropout": dropouts[-2] != 0, "optional_info": hn.optional_info,
    })
    return saved


def _plain_state(module: HypernetworkModule) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((key, tensor.detach().cpu().clone().contiguous())
                       for key, tensor in module.state_dict().items())


def save_hypernetwork(path: str | os.PathLike[str], hn: Hypernetwork, *, overwrite: bool = False) -> Path:
    """Write `hn` as an A1111-loadable `.pt`, atomically (temporary file, then rename)."""
    path = Path(path)
    if path.suffix.lower() != ".pt":
        raise SdkitError(f"{path}: A1111 loads hypernetworks only from .pt files")
    if path.is_dir():
        raise SdkitError(f"{path}: already exists (overwriting needs --force)")
    saved = hypernetwork_object(hn)
    return write_file_atomically(path, lambda partial: torch.save(saved, partial), overwrite=overwrite)
