"""Tables that never cut what they show.

Rich ends a cell that does not fit its column with "…"; a cut sha256 cannot be checked and
a cut path cannot be found. Every column here folds what does not fit onto the next line
instead. (Imported where a table is printed: rich stays out of the JSON paths.)
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import RenderableType
from rich.table import Table as RichTable
from rich.text import Text


class Table(RichTable):
    def add_column(self, *args: Any, **options: Any) -> None:
        options.setdefault("overflow", "fold")
        super().add_column(*args, **options)


def table_or_lines(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int,
                   title: str | None = None) -> RenderableType:
    """A table when every cell fits whole in `width` columns; on a narrower terminal one
    block per row instead — its first cell on a line, the others after it — which the
    console wraps but never cuts (a table would squeeze a column to nothing)."""
    widths = [max([len(header), *(len(row[index]) for row in rows)]) for index, header in enumerate(headers)]
    if sum(width + 3 for width in widths) + 1 <= width:
        table = Table(*headers, title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        return table
    lines = [title] if title else []
    for row in rows:
        lines.append(row[0])
        lines.append("  " + " · ".join(f"{header} {cell}" for header, cell in zip(headers[1:], row[1:])))
    return Text("\n".join(lines))
