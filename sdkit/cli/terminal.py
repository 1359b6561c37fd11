"""Everything the command line shows passes through here, made safe for a terminal.

File names, safetensors metadata, PNG parameters, tensor names and server answers are
written by whoever made the file. Printed raw, an ESC sequence in them can clear the
screen or set the window title, `\\r` or `\\b` can overwrite what was printed before, and
a bidi override (U+202E) can make `evil\\u202egnp.exe` read as `evilexe.png`. `shown`
escapes those characters into visible text (`\\x1b`, `\\u202e`), and the console and echo
helpers below apply it at the boundary, so the library keeps the real strings.

Rich also reads `[bold]` or `[link=…]` in a string as markup and `:smile:` as an emoji
code; the consoles made here do neither, so text styled on purpose is built as `Text`.
Progress-bar columns parse their text as markup on their own: a column that shows such
text is made with `markup=False` and given `shown(text)`.
JSON output needs nothing more: json.dumps escapes every control and non-ASCII character.
The rule itself lives in sdkit.cli.escape, which imports no rich: error lines and JSON
output need it without the consoles.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.text import Text

from sdkit.cli.escape import shown

__all__ = ["SafeConsole", "echo", "shown", "styled"]


class SafeConsole(Console):
    """A rich console that prints every string as literal, escaped text: no markup, no
    emoji codes, no highlighting, control and bidi characters escaped (titles and table
    cells included: rich turns every string into text through `render_str`)."""

    def __init__(self, **options: Any) -> None:
        for name in ("markup", "emoji", "highlight"):
            options.setdefault(name, False)
        super().__init__(**options)

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(shown(text), **options)


def echo(text: object = "", *, err: bool = False) -> None:
    """click.echo of `text`, escaped."""
    click.echo(shown(text), err=err)


def styled(text: str, style: str) -> Text:
    """Escaped `text` in a rich style: markup-free emphasis for the few styled words."""
    return Text(shown(text), style=style)
