"""Budgets of one restricted unpickling, enforced opcode by opcode.

A pickle is a program: a few kilobytes of it can loop over a memo entry to build a
million-deep tuple (hashing it later overflows the C stack and kills the process), a
shared-subtree "tree" whose unfolding is 2**60 nodes (hashing or printing it never ends),
or gigabytes of objects. `guarded_dispatch` wraps the opcodes of the pure-Python
unpickler so that every run stays within limits far above any real checkpoint (the
data.pkl of an SDXL checkpoint is ~30 opcodes per tensor, nested 5 levels deep):

- work: one unit per opcode (a few for those that make large objects), plus one per
  item a container takes in or a call copies (or per 64 bytes of text it copies), which
  bounds time (a few seconds) and memory (~70 bytes live per unit at most);
- memo entries;
- nesting depth and unfolded size of every container built or filled. For immutable
  containers (tuples, frozensets, slices: the only ones that can be hashed or compared
  while loading) both are exact when the container is made. For lists and dicts filled
  after being placed in another container they are a lower bound; the readers walk the
  finished object with limits of their own (flatten, materialize);
- integers: at most 2048 bits, so that every one can be printed
  (`sys.set_int_max_str_digits` allows no limit below 640 digits);
- opcodes no checkpoint uses (extension registry, NEWOBJ, out-of-band buffers, ...) and
  BUILD on anything but an OrderedDict are refused.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from itertools import chain
from typing import Any, Callable, Iterable

from sdkit.errors import with_article

MAX_WORK = 3_000_000
MAX_MEMO = 1_000_000
MAX_DEPTH = 200
MAX_NODES = 2_000_000
MAX_INT_BITS = 2048

_CONTAINERS = (tuple, list, dict, set, frozenset, slice)
Load = Callable[[Any], None]


class PickleLimit(Exception):
    """The pickle goes past one of the budgets above, or uses an opcode sdkit refuses."""


def _op(name: str) -> int:
    return getattr(pickle, name)[0]


# opcodes torch.save never writes: the copyreg extension registry (a process-wide cache
# that could hand out objects find_class never saw), class instantiation opcodes (every
# allowed callable is reached through REDUCE), out-of-band buffers and bytearrays
_REFUSED = {_op(name): name for name in ("EXT1", "EXT2", "EXT4", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ",
                                          "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER")}
_BUILDERS = {_op(name) for name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT", "FROZENSET")}
_FILLERS_AFTER_MARK = {_op(name) for name in ("APPENDS", "SETITEMS", "ADDITEMS")}
_FILLERS_OF_TOP = {_op("APPEND"): 1, _op("SETITEM"): 2}  # how many stack items they take
_MEMO_WRITERS = {_op(name) for name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")}
_INTEGERS = {_op(name) for name in ("INT", "LONG", "LONG1", "LONG4")}
# work units of the opcodes that make a larger object than most (a set is 216 bytes; a
# memo entry a dict slot and an int), so that a unit stays under ~70 bytes of memory
_COSTS = {_op("EMPTY_SET"): 4, _op("FROZENSET"): 4, _op("MARK"): 2, _op("REDUCE"): 2,
          **{code: 2 for code in _MEMO_WRITERS}}


def _items(container: Any) -> Iterable[Any]:
    if isinstance(container, dict):
        return chain(container.keys(), container.values())
    if isinstance(container, slice):
        return (container.start, container.stop, container.step)
    return container


class PickleGuard:
    """The budgets of one file's unpickling (the legacy layout's five pickles share one).
    `_shapes` keeps every measured container alive, so that no id is reused while the
    table refers to it."""

    def __init__(self) -> None:
        self.work = 0
        self._shapes: dict[int, tuple[Any, int, int]] = {}  # id -> (container, depth, nodes)

    def spend(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise PickleLimit(f"more than {MAX_WORK:,} pickle operations (sdkit's limit; "
                              "real checkpoints need a few hundred thousand)")

    def shape(self, value: Any) -> tuple[int, int]:
        """(nesting depth, nodes of the value unfolded as a tree)."""
        if not isinstance(value, _CONTAINERS):
            return 0, 1
        known = self._shapes.get(id(value))
        if known is not None:
            return known[1], known[2]
        # never measured: a container still empty (every opcode that puts items into
        # one measures it), so this looks one level down at most
        depth, nodes = 1, 1
        for item in _items(value):
            inner_depth, inner_nodes = self.shape(item)
            depth, nodes = max(depth, inner_depth + 1), nodes + inner_nodes
        return depth, nodes

    def built(self, container: Any) -> None:
        """A new container: measure it from its items (an empty one measures itself)."""
        if isinstance(container, slice) or isinstance(container, _CONTAINERS) and container:
            self._record(container, (0, 1), _items(container))

    def filled(self, container: Any, items: Iterable[Any], before: tuple[int, int]) -> None:
        """`items` were just put into `container`, whose shape was `before`."""
        self._record(container, before, items)

    def _record(self, container: Any, start: tuple[int, int], items: Iterable[Any]) -> None:
        depth, nodes = start
        count = 0
        for item in items:
            count += 1
            if not isinstance(item, _CONTAINERS):  # the common case, kept cheap
                nodes += 1
                depth = depth or 1
                continue
            inner_depth, inner_nodes = start if item is container else self.shape(item)
            depth, nodes = max(depth, inner_depth + 1), nodes + inner_nodes
        self.spend(count)
        if depth > MAX_DEPTH:
            raise PickleLimit(f"containers nested more than {MAX_DEPTH} levels deep (sdkit's limit)")
        if nodes > MAX_NODES:
            raise PickleLimit(f"a container of more than {MAX_NODES:,} entries once its shared parts are "
                              "counted each time they occur (sdkit's limit)")
        self._shapes[id(container)] = (container, depth, nodes)


# ---- the wrapped opcodes ---------------------------------------------------------------
# Each takes the unpickler (a pickle._Unpickler with a `guard`); `stack`, `metastack`,
# `memo` are the pure-Python unpickler's own attributes. `cost` is in work units.

def _counted(load: Load, cost: int) -> Load:
    def run(unpickler: Any) -> None:
        guard = unpickler.guard
        guard.work += cost  # spend(), inlined: most opcodes take this path
        if guard.work > MAX_WORK:
            guard.spend(0)  # raises
        load(unpickler)
    return run


def _building(load: Load, cost: int) -> Load:
    def run(unpickler: Any) -> None:
        unpickler.guard.spend(cost)
        load(unpickler)
        unpickler.guard.built(unpickler.stack[-1])
    return run


def _filling(load: Load, cost: int, taken: int | None) -> Load:
    """`taken` items from the top of the stack go into the container below them; None:
    every item since the last MARK goes into the container below the mark."""
    def run(unpickler: Any) -> None:
        guard = unpickler.guard
        guard.spend(cost)
        stack = unpickler.stack
        if taken is None:
            items, under, depth = stack, unpickler.metastack[-1] if unpickler.metastack else [], 1
        else:
            items, under, depth = stack[-taken:], stack, taken + 1
        # measured before it takes the items, which may include the container itself
        before = guard.shape(under[-depth]) if len(under) >= depth else (0, 1)
        load(unpickler)
        guard.filled(unpickler.stack[-1], items, before)
    return run


def _memo_writing(load: Load, cost: int) -> Load:
    def run(unpickler: Any) -> None:
        unpickler.guard.spend(cost)
        load(unpickler)
        if len(unpickler.memo) > MAX_MEMO:
            raise PickleLimit(f"more than {MAX_MEMO:,} memo entries (sdkit's limit)")
    return run


def _integer(load: Load, cost: int) -> Load:
    def run(unpickler: Any) -> None:
        unpickler.guard.spend(cost)
        try:
            load(unpickler)
        except ValueError:  # INT / LONG spell the number in text: Python stops at 4300 digits
            raise PickleLimit(f"an integer written in more digits than {MAX_INT_BITS}-bit integers "
                              "take, or not a number") from None
        value = unpickler.stack[-1]
        if type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise PickleLimit(f"an integer of {value.bit_length():,} bits (sdkit's limit: {MAX_INT_BITS})")
    return run


def _reduce(load: Load, cost: int) -> Load:
    def run(unpickler: Any) -> None:
        guard = unpickler.guard
        guard.spend(cost)
        arguments = unpickler.stack[-1]
        if type(arguments) is not tuple:
            raise PickleLimit("a call whose arguments are not a tuple")
        # an allowed callable may copy its argument (set(list), bytes of a str): pay for it
        copied = 0
        for value in arguments:
            if isinstance(value, (str, bytes)):
                copied += len(value) // 64
            elif isinstance(value, (tuple, list, dict, set, frozenset)):
                copied += len(value)
        guard.spend(copied)
        load(unpickler)
        guard.built(unpickler.stack[-1])
    return run


def _build(unpickler: Any) -> None:
    """BUILD sets attributes; only an OrderedDict gets one in real checkpoints (the
    `_metadata` of nn.Module state dicts), and nothing sdkit reads needs it: dropped."""
    unpickler.guard.spend(1)
    state = unpickler.stack.pop()
    target = unpickler.stack[-1]
    if type(target) is not OrderedDict or not (
            state is None or (type(state) is dict and all(type(key) is str for key in state))):
        named = getattr(target, "global_name", None)  # what find_class handed out
        raise PickleLimit(f"the pickle tries to set attributes of {named or with_article(type(target).__name__)} "
                          "(BUILD)")


def _refused(name: str) -> Load:
    def run(unpickler: Any) -> None:
        raise PickleLimit(f"opcode {name}, which checkpoints never use")
    return run


def _wrapped(code: int, load: Load) -> Load:
    cost = _COSTS.get(code, 1)
    if code in _REFUSED:
        return _refused(_REFUSED[code])
    if code in _BUILDERS:
        return _building(load, cost)
    if code in _FILLERS_AFTER_MARK:
        return _filling(load, cost, None)
    if code in _FILLERS_OF_TOP:
        return _filling(load, cost, _FILLERS_OF_TOP[code])
    if code in _MEMO_WRITERS:
        return _memo_writing(load, cost)
    if code in _INTEGERS:
        return _integer(load, cost)
    if code == _op("REDUCE"):
        return _reduce(load, cost)
    if code == _op("BUILD"):
        return _build
    return _counted(load, cost)


def guarded_dispatch(dispatch: dict[int, Load]) -> dict[int, Load]:
    """The unpickler's dispatch table with every opcode counted and checked."""
    return {code: _wrapped(code, load) for code, load in dispatch.items()}
