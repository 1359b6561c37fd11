"""The escaping rule for everything the command line shows (see sdkit.cli.terminal).

Kept apart from the rich consoles so that error lines, usage errors and `--json` output
can be printed without importing rich, which costs a command tens of milliseconds.
"""

from __future__ import annotations

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
