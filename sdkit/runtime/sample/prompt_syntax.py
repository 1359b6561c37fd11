"""A1111's prompt syntax: prompt editing and alternation per step, attention weights per piece of text.

Two passes, in A1111's order. First the whole prompt is read for step-dependent parts:

- `[before:after:when]` swaps `before` for `after` once `when` steps have passed, `[after:when]`
  adds text, `[before::when]` removes it. `when` with a decimal point is a fraction of the
  steps (`.25`, `0.5`, `1.0`), without one a step number; both are cut to the steps and
  truncated to a whole step, and a switch at step 0 is never listed.
- `[a|b|c]` cycles through its options, one per step (an empty option is empty text).

Both nest, in each other and inside `(…)`/`[…]`. A prompt this grammar cannot read (a `|`
outside any alternation, a trailing backslash) is used unchanged at every step, as A1111
does. `prompt_schedule` gives `(last step, text)` pairs, the text for steps up to and
including that step (counted from 0, as A1111's denoiser counts its calls).

Then each text is split into pieces of equal attention (`attention_pieces`): `(x)` ×1.1,
`[x]` ÷1.1, `(x:1.3)` ×1.3, nested brackets multiply, brackets left open multiply to the end,
`\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, and `BREAK` (a word of its own, in
capitals) is a piece of its own that starts a new 75-token chunk (`chunks.py`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sdkit.errors import SdkitError


@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: tuple[Node, ...] | None
    after: tuple[Node, ...]
    when: str  # the number as written


@dataclass(frozen=True)
class Alternation:
    options: tuple[tuple[Node, ...], ...]


Node = str | Edit | Alternation

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SPACE = re.compile(r"\s+")
_STRAY = "[]():"  # characters that may stand unmatched outside every bracket
_ENDS_TEXT = "[]():|\\"


class _Unreadable(Exception):
    """The prompt is not in the grammar; A1111 then uses it as it is."""


class _Reader:
    """A recursive-descent reader of the editing grammar; groups that do not close are None."""

    def __init__(self, text: str) -> None:
        self.text = text

    def at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def plain(self, pos: int) -> int:
        """The end of the plain text (escapes included) from `pos`."""
        while pos < len(self.text):
            char = self.text[pos]
            if char == "\\":
                if pos + 1 >= len(self.text) or self.text[pos + 1] == "\n":
                    break
                pos += 2
            elif char in _ENDS_TEXT:
                break
            else:
                pos += 1
        return pos

    def prompt(self, pos: int) -> tuple[list[Node], int]:
        """Text and groups up to the first character that ends a bracketed prompt."""
        nodes: list[Node] = []
        while True:
            end = self.plain(pos)
            if end > pos:
                nodes.append(self.text[pos:end])
                pos = end
                continue
            group = self.group(pos) if self.at(pos) in ("[", "(") else None
            if group is None:
                return nodes, pos
            found, pos = group
            nodes.extend(found)

    def group(self, pos: int) -> tuple[list[Node], int] | None:
        return self.round(pos) if self.at(pos) == "(" else self.square(pos)

    def round(self, pos: int) -> tuple[list[Node], int] | None:
        """`(p)` or `(p:q)`: kept as written, the inner prompts still read."""
        inner, end = self.prompt(pos + 1)
        nodes: list[Node] = ["(", *inner]
        if self.at(end) == ":":
            second, end = self.prompt(end + 1)
            nodes += [":", *second]
        if self.at(end) != ")":
            return None
        return nodes + [")"], end + 1

    def square(self, pos: int) -> tuple[list[Node], int] | None:
        first, end = self.prompt(pos + 1)
        mark = self.at(end)
        if mark == "]":
            return ["[", *first, "]"], end + 1
        if mark == "|":
            return self.alternation(first, end)
        if mark == ":":
            return self.edit(first, end + 1)
        return None

    def alternation(self, first: list[Node], pos: int) -> tuple[list[Node], int] | None:
        options = [tuple(first)]
        while self.at(pos) == "|":
            option, pos = self.prompt(pos + 1)
            options.append(tuple(option))
        if self.at(pos) != "]":
            return None
        return [Alternation(tuple(options))], pos + 1

    def when(self, pos: int) -> tuple[str, int] | None:
        """`[space] NUMBER [space] ]` from `pos`: (the number, the end)."""
        pos = self.skip_space(pos)
        number = _NUMBER.match(self.text, pos)
        if number is None:
            return None
        end = self.skip_space(number.end())
        return (number.group(0), end + 1) if self.at(end) == "]" else None

    def skip_space(self, pos: int) -> int:
        space = _SPACE.match(self.text, pos)
        return space.end() if space else pos

    def edit(self, first: list[Node], pos: int) -> tuple[list[Node], int] | None:
        added = self.when(pos)
        if added is not None:  # [after:when]
            return [Edit(None, tuple(first), added[0])], added[1]
        second, end = self.prompt(pos)
        if self.at(end) != ":":
            return None
        swapped = self.when(end + 1)
        if swapped is None:
            return None
        return [Edit(tuple(first), tuple(second), swapped[0])], swapped[1]

    def read(self) -> tuple[Node, ...]:
        """The whole prompt; outside brackets `[]():` may stand alone."""
        nodes: list[Node] = []
        pos = 0
        while pos < len(self.text):
            found, end = self.prompt(pos)
            nodes.extend(found)
            if end >= len(self.text):
                break
            if self.text[end] not in _STRAY:
                raise _Unreadable  # a `|` outside an alternation, a backslash at the end
            nodes.append(self.text[end])
            pos = end + 1
        return tuple(nodes)


def parse_prompt(prompt: str) -> tuple[Node, ...] | None:
    """The prompt's text, edits and alternations; None when A1111 would not read it."""
    try:
        return _Reader(prompt).read()
    except _Unreadable:
        return None


def switch_step(when: str, steps: int, first_pass: int | None = None) -> int:
    """The step after which an edit switches: a number written with a decimal point is a
    fraction of `steps`, otherwise a step; at most `steps`, truncated to a whole step. In a
    second pass after `first_pass` steps (hires fix), steps count on from the first pass
    and fractions from 1 (A1111: `1.5` is halfway through the second pass)."""
    value = float(when)
    if "." in when:
        value = (value - (1.0 if first_pass is not None else 0.0)) * steps
    elif first_pass is not None:
        value -= first_pass
    return min(steps, int(value))


def _walk(nodes: Sequence[Node]):
    for node in nodes:
        yield node
        if isinstance(node, Edit):
            yield from _walk(node.before or ())
            yield from _walk(node.after)
        elif isinstance(node, Alternation):
            for option in node.options:
                yield from _walk(option)


def _text_at(nodes: Sequence[Node], step: int, steps: int, first_pass: int | None) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, Edit):
            chosen = (node.before or ()) if step <= switch_step(node.when, steps, first_pass) else node.after
            parts.append(_text_at(chosen, step, steps, first_pass))
        else:
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps, first_pass))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, first_pass: int | None = None) -> list[tuple[int, str]]:
    """(last step, text) pairs covering steps 0..`steps`, as A1111's
    `get_learned_conditioning_prompt_schedules` lists them (`first_pass`: the steps of the
    pass before this one, for a hires pass)."""
    nodes = parse_prompt(prompt)
    if nodes is None:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, Edit) and switch_step(node.when, steps, first_pass) >= 1:
            ends.add(switch_step(node.when, steps, first_pass))
        elif isinstance(node, Alternation):
            ends.update(range(1, steps + 1))
    return [(end, _text_at(nodes, end, steps, first_pass)) for end in sorted(ends)]


def text_at_step(schedule: Sequence[tuple[int, object]], step: int) -> int:
    """The index of the schedule entry used at denoising step `step` (from 0)."""
    return next((index for index, (end, _) in enumerate(schedule) if step <= end), 0)


# ---- attention -----------------------------------------------------------------------------------

BREAK = -1.0  # the weight that marks a BREAK piece
ROUND = 1.1
SQUARE = 1 / 1.1
_ATTENTION = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def attention_pieces(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces of one prompt text, neighbours of equal weight joined;
    a BREAK is the piece ("BREAK", -1)."""
    pieces: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            multiply(opened["("].pop(), _weight(weight, token))
        elif token == ")" and opened["("]:
            multiply(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            multiply(opened["["].pop(), SQUARE)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in opened["("]:
        multiply(start, ROUND)
    for start in opened["["]:
        multiply(start, SQUARE)
    return _joined(pieces or [["", 1.0]])


def _weight(text: str, token: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SdkitError(f"prompt: {token!r} has no readable weight") from None


def _joined(pieces: list[list]) -> list[tuple[str, float]]:
    joined: list[list] = [pieces[0]]
    for text, weight in pieces[1:]:
        if joined[-1][1] == weight:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    return [(text, weight) for text, weight in joined]


def is_break(piece: tuple[str, float]) -> bool:
    return piece == ("BREAK", BREAK)
