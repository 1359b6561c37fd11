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

from sdkit.io.unpickler import PickledTensor, printable

_MAX_DEPTH = 100
# far above any real checkpoint (a few thousand tensors); stop pickles built to explode.
# Nodes count a container shared by several parents once per parent, as printing or
# flattening it would.
_MAX_NODES = 2_000_000
_MAX_NAMES = 200_000
_MAX_NAME_LENGTH = 4096  # real tensor names are under 300 characters


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
        self._measured: dict[int, tuple[bool, int]] = {}  # id -> (holds a tensor, nodes unfolded)
        self._open: set[int] = set()
        self._nodes = 0

    def _count(self, depth: int, nodes: int = 1) -> None:
        self._nodes += nodes
        if self._nodes > _MAX_NODES:
            raise FlattenError(f"more than {_MAX_NODES:,} objects once shared containers are counted "
                               "where each occurs")
        if depth > _MAX_DEPTH:
            raise FlattenError(f"containers nested deeper than {_MAX_DEPTH} levels")

    def holds_tensor(self, value: Any, depth: int = 0) -> bool:
        return self._measure(value, depth)[0]

    def _measure(self, value: Any, depth: int = 0) -> tuple[bool, int]:
        """(holds a tensor, nodes of the value unfolded as a tree)."""
        if isinstance(value, PickledTensor):
            return True, 1
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return False, 1
        known = self._measured.get(id(value))
        if known is not None:
            return known
        if id(value) in self._open:
            raise FlattenError("a container contains itself")
        self._count(depth)
        self._open.add(id(value))
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else list(value)
        found, nodes = False, 1
        for item in items:  # no short cut: every container is visited, so cycles are found
            holds, inner = self._measure(item, depth + 1)
            found, nodes = found or holds, nodes + inner
        self._open.discard(id(value))
        self._measured[id(value)] = found, nodes
        return found, nodes

    def add(self, name: str, value: Any, depth: int) -> None:
        if len(name) > _MAX_NAME_LENGTH:  # else nesting a long key would repeat it in every name below
            raise FlattenError(f"a name longer than {_MAX_NAME_LENGTH} characters ({printable(name)!r})")
        self._count(depth)
        holds, nodes = self._measure(value)
        if not holds:
            self._count(depth, nodes - 1)  # kept whole: whoever prints it walks it all
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
            raise FlattenError(f"a tensor sits inside a set at {printable(name)!r}")

    def _put(self, target: dict[str, Any], name: str, value: Any) -> None:
        if name in self.result.tensors or name in self.result.extra:
            raise FlattenError(f"two entries flatten to the same name {printable(name)!r}")
        if len(self.result.tensors) + len(self.result.extra) >= _MAX_NAMES:
            raise FlattenError(f"more than {_MAX_NAMES:,} tensor and value names")
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
