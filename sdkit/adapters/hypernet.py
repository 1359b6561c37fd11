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
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from sdkit.arch.hypernetwork_detect import is_hypernetwork
from sdkit.errors import SdkitError
from sdkit.io import ModelFile, open_model
from sdkit.io.output_path import write_file_atomically

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
_KEY = re.compile(r"^(\d+)\.([01])\.(.+)$")
_OLD_KEYS = {"linear1.": "linear.0.", "linear2.": "linear.1."}  # A1111 fix_old_state_dict
_LAST_LAYER_DROPOUT = 0.3  # what A1111 uses when only use_dropout flags are stored


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
    structure = settings.layer_structure
    activation = _activation_class(settings.activation_func)
    dropouts = settings.dropouts()
    last = len(structure) - 2
    for index in range(len(structure) - 1):
        outputs = int(width * structure[index + 1])
        yield nn.Linear(int(width * structure[index]), outputs)
        if activation is not None and (index < last or settings.activate_output):
            yield activation()
        if settings.add_layer_norm:
            yield nn.LayerNorm(outputs)
        if dropouts[index + 1] > 0:
            yield nn.Dropout(p=dropouts[index + 1])


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
    layers = {}
    for width, pair in sorted(_state_dicts(model).items()):
        if set(pair) != {0, 1}:
            raise SdkitError(f"{model.path}: width {width} lacks its "
                             f"{'value' if 0 in pair else 'key'} module")
        layers[width] = (_loaded(model.path, width, "key", pair[0], settings),
                         _loaded(model.path, width, "value", pair[1], settings))
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
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or min(structure) <= 0:
        raise SdkitError(f"{path}: layer_structure {list(structure)} must start and end with 1 "
                         "and hold positive multipliers")
    dropouts = settings.dropouts()
    if len(dropouts) < len(structure) or not all(0 <= p < 1 for p in dropouts):
        raise SdkitError(f"{path}: dropout_structure {list(dropouts)} needs one probability in "
                         f"[0, 1) per layer_structure entry ({len(structure)})")
    if settings.weight_init not in WEIGHT_INITS:
        raise SdkitError(f"{path}: unknown weight_initialization {settings.weight_init!r} "
                         f"(one of {', '.join(WEIGHT_INITS)})")
    try:
        _activation_class(settings.activation_func)
    except SdkitError as exc:
        raise SdkitError(f"{path}: {exc}") from None


def _state_dicts(model: ModelFile) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """width -> {0: key-module state dict, 1: value-module state dict}, old names renamed."""
    found: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for name in model.infos:
        width, which, key = _KEY.match(name).groups()  # type: ignore[union-attr]
        for old, new in _OLD_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        found.setdefault(int(width), {}).setdefault(int(which), {})[key] = model.load(name)
    return found


def _loaded(path: Path, width: int, role: str, state: dict[str, torch.Tensor],
            settings: HypernetworkSettings) -> HypernetworkModule:
    module = HypernetworkModule(width, settings)
    expected = {key: tensor.shape for key, tensor in module.state_dict().items()}
    problems = sorted(expected.keys() ^ state.keys()) + sorted(
        key for key in expected.keys() & state.keys() if expected[key] != state[key].shape)
    if problems:
        raise SdkitError(f"{path}: width {width} {role} module does not match layer_structure "
                         f"{list(settings.layer_structure)} with these settings "
                         f"(differs at {', '.join(problems[:3])})")
    module.load_state_dict(state)  # copies into the float32 parameters, as in A1111
    return module


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
