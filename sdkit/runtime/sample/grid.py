"""Grids of samples with labelled rows and columns, and the XY axis specification.

`grid_image` lays equally sized pictures out in rows and columns and writes the column
labels above and the row labels to the left (PIL's default font, wrapped to fit; a slot
grows where a label cannot be wrapped narrow enough, so labels never overlap).
`parse_axis("cfg=3,5,7")` reads an XY axis: one parameter and the values it takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sdkit.errors import SdkitError

AXIS_PARAMETERS: dict[str, Callable[[str], Any]] = {
    "lora_strength": float, "steps": int, "cfg": float, "seed": int, "clip_skip": int, "scheduler": str,
    "schedule": str, "denoise": float,
}
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)


@dataclass(frozen=True)
class Axis:
    parameter: str
    values: tuple[Any, ...]

    def label(self, value: Any) -> str:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{self.parameter}={shown}"


def parse_axis(text: str) -> Axis:
    """`PARAM=V1,V2,...` with PARAM one of AXIS_PARAMETERS."""
    parameter, sep, values = text.partition("=")
    parameter = parameter.strip().replace("-", "_")
    if not sep or parameter not in AXIS_PARAMETERS:
        raise SdkitError(f"--xy {text!r}: expected PARAM=V1,V2,... with PARAM one of "
                         f"{', '.join(AXIS_PARAMETERS)}")
    kind = AXIS_PARAMETERS[parameter]
    items = [item.strip() for item in values.split(",") if item.strip()]
    if not items:
        raise SdkitError(f"--xy {text!r}: no values")
    try:
        return Axis(parameter, tuple(kind(item) for item in items))
    except ValueError:
        raise SdkitError(f"--xy {text!r}: {parameter} takes {kind.__name__} values") from None


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_BREAK_AFTER = re.compile(r"[^=,]+[=,]?|[=,]")  # a label may break after "=" or ","

Box = tuple[int, int, int, int]  # left, top, right, bottom


def _pieces(text: str) -> list[tuple[str, str]]:
    """(piece, what joins it to the previous one): words, themselves split after "=" and
    ",", so `lora_strength=0.75` can break as `lora_strength=` / `0.75`."""
    pieces: list[tuple[str, str]] = []
    for word in text.split():
        for index, piece in enumerate(_BREAK_AFTER.findall(word)):
            pieces.append((piece, "" if index else " "))
    return pieces


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy wrap to `width` pixels at spaces and after "=" / ","; a piece wider than
    `width` stays on its own line (the layout then widens its slot)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for piece, glue in _pieces(paragraph):
            candidate = f"{line}{glue}{piece}" if line else piece
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = piece
            else:
                line = candidate
        lines.append(line)
    return lines


def _block_size(draw: Any, lines: list[str], font: Any, spacing: int) -> tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), "\n".join(lines) or " ", font=font, spacing=spacing, align="center")
    return math.ceil(box[2] - box[0]), math.ceil(box[3] - box[1])  # FreeType measures in fractions


@dataclass
class GridLayout:
    """Where everything of a grid goes: no label overlaps another label or a picture."""

    size: tuple[int, int]
    cells: list[list[Box]]  # [row][column], each exactly a picture's size
    labels: list[tuple[Box, list[str]]]  # the box each label's lines are drawn in
    font: Any
    spacing: int


def grid_layout(rows: int, columns: int, cell_size: tuple[int, int], column_labels: Sequence[str],
                row_labels: Sequence[str]) -> GridLayout:
    """Slots at least a picture's size, wider or taller where a label needs the room;
    pictures centred in their slots, labels centred over their column / beside their row."""
    from PIL import Image, ImageDraw

    cell_width, cell_height = cell_size
    font_size = max(10, min(32, cell_width // 12))
    font, spacing, pad = _font(font_size), font_size // 4, font_size // 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    column_text = [_wrap(scratch, label, font, max(cell_width - 2 * pad, font_size)) for label in column_labels]
    row_text = [_wrap(scratch, label, font, max(cell_width, 8 * font_size)) for label in row_labels]
    column_sizes = [_block_size(scratch, lines, font, spacing) for lines in column_text]
    row_sizes = [_block_size(scratch, lines, font, spacing) for lines in row_text]
    slot_width = max([cell_width] + [width + 2 * pad for width, _ in column_sizes])
    slot_height = max([cell_height] + [height + 2 * pad for _, height in row_sizes])
    top = max(height for _, height in column_sizes) + 2 * pad if column_labels else 0
    left = max(width for width, _ in row_sizes) + 2 * pad if row_labels else 0
    labels = []
    for column, ((width, height), lines) in enumerate(zip(column_sizes, column_text)):
        x, y = left + column * slot_width + (slot_width - width) // 2, (top - height) // 2
        labels.append(((x, y, x + width, y + height), lines))
    for row, ((width, height), lines) in enumerate(zip(row_sizes, row_text)):
        y = top + row * slot_height + (slot_height - height) // 2
        labels.append(((pad, y, pad + width, y + height), lines))
    x0, y0 = (slot_width - cell_width) // 2, (slot_height - cell_height) // 2
    cells = [[(left + column * slot_width + x0, top + row * slot_height + y0,
               left + column * slot_width + x0 + cell_width, top + row * slot_height + y0 + cell_height)
              for column in range(columns)] for row in range(rows)]
    return GridLayout((left + columns * slot_width, top + rows * slot_height), cells, labels, font, spacing)


def grid_image(cells: Sequence[Sequence[Any]], column_labels: Sequence[str],
               row_labels: Sequence[str]) -> Any:
    """One picture: `cells[row][column]` (PIL images of one size) under column labels and
    beside row labels. Empty label lists leave that margin out."""
    from PIL import Image, ImageDraw

    columns = len(cells[0])
    if any(len(images) != columns for images in cells):
        raise ValueError("every grid row needs the same number of pictures")
    layout = grid_layout(len(cells), columns, cells[0][0].size, column_labels, row_labels)
    grid = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for (x, y, _, _), lines in layout.labels:
        text = "\n".join(lines)
        # the text's ink starts at its bounding box's corner, not at the point it is drawn at
        ink_left, ink_top, _, _ = draw.multiline_textbbox((0, 0), text or " ", font=layout.font,
                                                           spacing=layout.spacing, align="center")
        draw.multiline_text((x - ink_left, y - ink_top), text, fill=_INK, font=layout.font,
                            spacing=layout.spacing, align="center")
    for images, boxes in zip(cells, layout.cells):
        for image, box in zip(images, boxes):
            grid.paste(image.convert("RGB"), box[:2])
    return grid
