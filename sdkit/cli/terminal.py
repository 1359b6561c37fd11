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
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.text import Text

# kept: they only break lines, and multi-line output (JSON, click's usage text) needs them
_LAYOUT = {"\n", "\t"}
# Unicode's Bidi_Control characters: they reorder the text that follows them on screen
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
# line and paragraph separators: some terminals and viewers start a new line at them
_SEPARATORS = [0x2028, 0x2029]


def _escape_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]:  # C0, DEL, C1
        if chr(code) not in _LAYOUT:
            table[code] = f"\\x{code:02x}"
    for code in _BIDI + _SEPARATORS:
        table[code] = f"\\u{code:04x}"
    return table


_ESCAPES = _escape_table()


def shown(text: object) -> str:
    """`text` as a terminal may display it: control and bidi characters written out as
    escapes (`\\x1b`, `\\u202e`); newlines and tabs kept."""
    return str(text).translate(_ESCAPES)


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
