"""The registry of merge methods: `@merge_method` turns a small function into a named,
typed, documented method the engine and the CLI can call.

A method is a pure function of one key at a time. Its signature declares everything:

    @merge_method
    def weighted_sum(a: Tensor, b: Tensor, *, alpha: float = 0.5) -> Tensor:
        "(1 - alpha)·A + alpha·B."

- positional parameters are the input models' tensors for that key (float32), in the
  order the models were given; a `*models` parameter accepts any number of them;
- keyword-only parameters annotated `float`, `int`, `bool` or `str` are the method's
  parameters, with their defaults; `alpha`, when present, is the one the per-block and
  per-component weights set for each key;
- a keyword-only `key: str` receives the tensor's name (methods that seed a random
  generator per key use it).

`elementwise=True` promises that each output element depends only on the same element
of the inputs, which lets the engine compute a large tensor in slices.

`streamed=fn` gives a method that is not elementwise a second form the engine uses
instead: `fn(reader, **params)` reads the inputs a slice at a time through a
`streamed.SliceReader` (as many passes as it needs) and yields the output slice after
slice, in order; its numbers must be those of the whole-tensor function.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from sdkit.errors import SdkitError

PARAM_TYPES: tuple[type, ...] = (float, int, bool, str)
BLEND_PARAM = "alpha"  # the parameter per-block / per-component weights set


@dataclass(frozen=True)
class MethodParam:
    """One typed parameter of a merge method."""

    name: str
    type: type
    default: Any

    def coerce(self, value: Any, method: str) -> Any:
        """`value` (from YAML, JSON or a command line string) as this parameter's type."""
        try:
            if self.type is bool:
                return _as_bool(value)
            if self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if self.type is int:
                return int(float(value)) if isinstance(value, str) else int(value)
            return self.type(value)
        except (TypeError, ValueError):
            raise SdkitError(f"merge method {method}: parameter {self.name} must be "
                             f"{self.type.__name__}, got {value!r}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, how many models it takes, its parameters."""

    name: str
    function: Callable[..., Any]
    min_inputs: int
    max_inputs: int | None  # None: any number from min_inputs up
    params: dict[str, MethodParam]
    wants_key: bool
    elementwise: bool
    doc: str
    check: Callable[[dict[str, Any]], str | None] | None = None
    copies_input: str | None = None
    streamed: Callable[..., Iterator[Any]] | None = None  # the slice-at-a-time form

    @property
    def has_alpha(self) -> bool:
        return BLEND_PARAM in self.params

    def arity_text(self) -> str:
        if self.max_inputs == self.min_inputs:
            return f"{self.min_inputs}"
        if self.max_inputs is None:
            return f"{self.min_inputs} or more"
        return f"{self.min_inputs} to {self.max_inputs}"

    def check_inputs(self, count: int) -> None:
        too_few = count < self.min_inputs
        too_many = self.max_inputs is not None and count > self.max_inputs
        if too_few or too_many:
            raise SdkitError(f"merge method {self.name} takes {self.arity_text()} models, "
                             f"got {count}")

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `given`, each coerced to its declared type."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise SdkitError(f"merge method {self.name} has no parameter {unknown[0]} "
                             f"(its parameters: {known})")
        values = {name: p.default for name, p in self.params.items()}
        for name, value in given.items():
            values[name] = self.params[name].coerce(value, self.name)
        return values

    def check_params(self, params: dict[str, Any]) -> None:
        """Refuse out-of-range values before any work starts."""
        if self.check is not None:
            problem = self.check(params)
            if problem:
                raise SdkitError(f"merge method {self.name}: {problem}")

    def source_index(self, params: dict[str, Any]) -> int | None:
        """For a method that copies one input whole: which one (0 = A)."""
        if self.copies_input is None:
            return None
        return input_index(params[self.copies_input])

    def __call__(self, tensors: list[Any], params: dict[str, Any], key: str) -> Any:
        return self.function(*tensors, **self._kwargs(params, key))

    def stream(self, reader: Any, params: dict[str, Any], key: str) -> Iterator[Any]:
        """The output slice after slice, from the streamed form (which must exist)."""
        assert self.streamed is not None
        return self.streamed(reader, **self._kwargs(params, key))

    def _kwargs(self, params: dict[str, Any], key: str) -> dict[str, Any]:
        kwargs = dict(params)
        if self.wants_key:
            kwargs["key"] = key
        return kwargs


METHODS: dict[str, MergeMethod] = {}


def merge_method(function: Callable[..., Any] | None = None, *, name: str | None = None,
                 elementwise: bool = False,
                 check: Callable[[dict[str, Any]], str | None] | None = None,
                 copies_input: str | None = None,
                 streamed: Callable[..., Iterator[Any]] | None = None) -> Any:
    """Register `function` as a merge method (usable bare or with arguments).

    `check(params)` returns a problem description for out-of-range parameters;
    `copies_input` names the parameter of a method that returns one input unchanged, so
    the engine reads only that input; `streamed` is the slice-at-a-time form of a method
    that is not elementwise.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        method = _describe(fn, name or fn.__name__, elementwise)
        method = replace(method, check=check, copies_input=copies_input, streamed=streamed)
        if method.name in METHODS:
            raise ValueError(f"merge method {method.name} registered twice")
        METHODS[method.name] = method
        return fn

    return register(function) if function is not None else register


def _describe(fn: Callable[..., Any], name: str, elementwise: bool) -> MergeMethod:
    hints = typing.get_type_hints(fn)
    positional = 0
    variadic = False
    wants_key = False
    params: dict[str, MethodParam] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
        elif p.kind is p.VAR_POSITIONAL:
            variadic = True
        elif p.kind is p.KEYWORD_ONLY and p.name == "key":
            wants_key = True
        elif p.kind is p.KEYWORD_ONLY:
            kind = hints.get(p.name)
            if kind not in PARAM_TYPES or p.default is p.empty:
                raise TypeError(f"{name}: parameter {p.name} needs a float/int/bool/str "
                                "annotation and a default")
            params[p.name] = MethodParam(p.name, kind, p.default)
        else:
            raise TypeError(f"{name}: **kwargs is not allowed in a merge method")
    doc = inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    return MergeMethod(
        name=name, function=fn, min_inputs=max(positional + int(variadic), 1),
        max_inputs=None if variadic else positional, params=params,
        wants_key=wants_key, elementwise=elementwise, doc=doc,
    )


def input_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ... (inputs are named by position)."""
    return chr(ord("A") + index)


def input_index(name: str | int) -> int:
    """"A" / "a" / 0 -> 0, "B" -> 1, ..."""
    if isinstance(name, int):
        return name
    text = name.strip().upper()
    if len(text) == 1 and "A" <= text <= "Z":
        return ord(text) - ord("A")
    raise SdkitError(f"{name!r} is not an input name (A, B, C, ...)")


def get_method(name: str) -> MergeMethod:
    """The method registered as `name` (dashes and underscores are interchangeable)."""
    method = METHODS.get(name.replace("-", "_"))
    if method is None:
        raise SdkitError(f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})")
    return method
