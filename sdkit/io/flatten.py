"""Turn an unpickled checkpoint object into flat tensor names plus non-tensor extras.

Rule (other modules rely on it exactly):
- dicts, lists and tuples that contain a tensor somewhere are flattened, joining
  `str(key)` / list index with "." (`{768: (sd_k, sd_v)}` -> `768.0.linear.0.weight`);
- a container without any tensor is kept whole in `extra` under its dotted path, and so
  is every non-tensor value met along the way (`layer_structure`, `name`, `step`);
- a top-level dict whose `state_dict` entry is a dict holding tensors is unwrapped
  (repeatedly, for doubly wrapped files): tensors come from it unprefixed, its siblings
  go to `extra` when they hold no tensor, and siblings that do hold tensors (optimizer
  state, callbacks) are left out;
- a bare tensor at top level is the single tensor named "".
`metadata` renders the top-level str/int/float/bool extras as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdkit.io.unpickler import PickledTensor

_MAX_DEPTH = 100
_MAX_NODES = 2_000_000  # far above any real checkpoint; stops pickles built to explode


class FlattenError(ValueError):
    """The object cannot be flattened (cycle, too deep, name clash, tensor in a set)."""


@dataclass
class Flattened:
    tensors: dict[str, PickledTensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


class _Walker:
    def __init__(self) -> None:
        self.result = Flattened()
        self._holds_tensor: dict[int, bool] = {}
        self._open: set[int] = set()
        self._nodes = 0

    def _count(self, depth: int) -> None:
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise FlattenError(f"more than {_MAX_NODES} objects")
        if depth > _MAX_DEPTH:
            raise FlattenError(f"containers nested deeper than {_MAX_DEPTH} levels")

    def holds_tensor(self, value: Any, depth: int = 0) -> bool:
        if isinstance(value, PickledTensor):
            return True
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return False
        known = self._holds_tensor.get(id(value))
        if known is not None:
            return known
        if id(value) in self._open:
            raise FlattenError("a container contains itself")
        self._count(depth)
        self._open.add(id(value))
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
        found = False
        for item in items:  # no short cut: every container is visited, so cycles are found
            found = self.holds_tensor(item, depth + 1) or found
        self._open.discard(id(value))
        self._holds_tensor[id(value)] = found
        return found

    def add(self, name: str, value: Any, depth: int) -> None:
        self._count(depth)
        if not self.holds_tensor(value):
            self._put(self.result.extra, name, value)
        elif isinstance(value, PickledTensor):
            self._put(self.result.tensors, name, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.add(_join(name, _key_name(self, key)), item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self.add(_join(name, str(index)), item, depth + 1)
        else:
            raise FlattenError(f"a tensor sits inside a set at {name!r}")

    def _put(self, target: dict[str, Any], name: str, value: Any) -> None:
        if name in self.result.tensors or name in self.result.extra:
            raise FlattenError(f"two entries flatten to the same name {name!r}")
        target[name] = value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_wrapper(walker: _Walker, obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) \
        and walker.holds_tensor(obj["state_dict"])


def _key_name(walker: _Walker, key: Any) -> str:
    if walker.holds_tensor(key):
        raise FlattenError("a tensor is used as a dict key")
    return str(key)


def flatten_checkpoint(obj: Any) -> Flattened:
    """Apply the flattening rule above; FlattenError for objects it cannot express."""
    walker = _Walker()
    top_level: list[tuple[str, Any]] = []
    while _is_wrapper(walker, obj):
        top_level += [(_key_name(walker, key), value) for key, value in obj.items()
                      if key != "state_dict" and not walker.holds_tensor(value)]
        obj = obj["state_dict"]
    if isinstance(obj, dict):
        top_level += [(_key_name(walker, key), value) for key, value in obj.items()]
    else:
        walker.add("", obj, 0)
    for name, value in top_level:
        walker.add(name, value, 0)
    walker.result.metadata = {name: str(value) for name, value in top_level
                              if isinstance(value, (str, int, float, bool))}
    return walker.result
