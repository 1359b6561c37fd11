"""Grids of samples with labelled rows and columns, and the XY axis specification.

`grid_image` lays equally sized pictures out in rows and columns and writes the column
labels above and the row labels to the left (PIL's default font, wrapped to fit).
`parse_axis("cfg=3,5,7")` reads an XY axis: one parameter and the values it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sdkit.errors import SdkitError

AXIS_PARAMETERS: dict[str, Callable[[str], Any]] = {
    "lora_strength": float, "steps": int, "cfg": float, "seed": int, "clip_skip": int, "scheduler": str,
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


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a single long word stays on its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _block_size(draw: Any, lines: list[str], font: Any, spacing: int) -> tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), "\n".join(lines) or " ", font=font, spacing=spacing)
    return box[2] - box[0], box[3] - box[1]


def grid_image(cells: Sequence[Sequence[Any]], column_labels: Sequence[str],
               row_labels: Sequence[str]) -> Any:
    """One picture: `cells[row][column]` (PIL images of one size) under column labels and
    beside row labels. Empty label lists leave that margin out."""
    from PIL import Image, ImageDraw

    rows, columns = len(cells), len(cells[0])
    cell_width, cell_height = cells[0][0].size
    font_size = max(10, min(32, cell_width // 12))
    font, spacing, pad = _font(font_size), font_size // 4, font_size // 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(cell_width, 8 * font_size)
    column_text = [_wrap(scratch, label, font, max(cell_width - 2 * pad, font_size)) for label in column_labels]
    row_text = [_wrap(scratch, label, font, label_width) for label in row_labels]
    top = max((_block_size(scratch, lines, font, spacing)[1] for lines in column_text), default=-2 * pad)
    left = max((_block_size(scratch, lines, font, spacing)[0] for lines in row_text), default=-2 * pad)
    top, left = top + 2 * pad if column_labels else 0, left + 2 * pad if row_labels else 0
    grid = Image.new("RGB", (left + columns * cell_width, top + rows * cell_height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(column_text):
        width, height = _block_size(draw, lines, font, spacing)
        x = left + column * cell_width + (cell_width - width) // 2
        draw.multiline_text((x, (top - height) // 2), "\n".join(lines), fill=_INK, font=font,
                            spacing=spacing, align="center")
    for row, lines in enumerate(row_text):
        height = _block_size(draw, lines, font, spacing)[1]
        draw.multiline_text((pad, top + row * cell_height + (cell_height - height) // 2), "\n".join(lines),
                            fill=_INK, font=font, spacing=spacing)
    for row, images in enumerate(cells):
        if len(images) != columns:
            raise ValueError("every grid row needs the same number of pictures")
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB"), (left + column * cell_width, top + row * cell_height))
    return grid
