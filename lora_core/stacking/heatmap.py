"""Draw a LoRA-pair x block table of cosines as an IMAGE tensor ([1, H, W, 3], 0..1), PIL only.

Blue = the pair pulls the block in opposite ways, white = independent, red = same way;
grey = the pair shares no layer there. Every cell prints its value. Past MAX_WIDTH the
columns wrap into further panels below, so a 60-block transformer stays readable.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import caches
from ..errors import LoRASettingsError, LoRAShapeError

CELL = 40  # px per cell: room for "-0.83" in the default font
PAD = 8
FONT_SIZE = 12
MAX_WIDTH = 1600  # px; wider tables wrap into panels
MAX_LABEL_CHARS = 40
DEFAULT_TITLE = "LoRA overlap per block (cosine of their weight changes)"
EMPTY_MESSAGE = "no layer is patched by two of these LoRAs: nothing to compare"

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
NEGATIVE = (59, 76, 192)  # the ends of the "coolwarm" map: a blue and a red that stay
POSITIVE = (180, 4, 38)   # apart for colour-blind readers, white in the middle
MISSING = (170, 170, 170)
GRID_LINE = (225, 225, 225)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def colour_of(value: float) -> tuple[int, int, int]:
    """Diverging map: -1 blue, 0 white, +1 red (clipped); NaN grey."""
    if value is None or math.isnan(value):
        return MISSING
    t = max(-1.0, min(1.0, float(value)))
    end = POSITIVE if t > 0 else NEGATIVE
    a = abs(t)
    return tuple(round(w + (e - w) * a) for w, e in zip(BACKGROUND, end))


def _short(text: str) -> str:
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 2] + ".."


def _text_size(font, text: str) -> tuple[int, int, int, int]:
    """(width, height, x offset, y offset) of the ink box, so text can be centred by hand."""
    x0, y0, x1, y1 = font.getbbox(text) if text else (0, 0, 0, 0)
    return x1 - x0, y1 - y0, x0, y0


@dataclass
class HeatmapLayout:
    width: int
    height: int
    title_y: int
    legend_y: int
    label_width: int
    col_label_height: int
    panel_cols: int  # columns per panel
    panel_tops: list[int]  # y of each panel's grid
    n_rows: int
    n_cols: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a cell, x1/y1 exclusive."""
        panel, within = divmod(col, self.panel_cols)
        x0 = self.label_width + within * CELL
        y0 = self.panel_tops[panel] + row * CELL
        return x0, y0, x0 + CELL, y0 + CELL


def heatmap_layout(rows: Sequence[str], cols: Sequence[str], title: str = DEFAULT_TITLE) -> HeatmapLayout:
    font = _font()
    line = _text_size(font, "Ag0")[1] + 4
    label_width = max([_text_size(font, _short(r))[0] for r in rows] + [0]) + 2 * PAD
    col_label_height = max([_text_size(font, _short(c))[0] for c in cols] + [0]) + PAD
    panel_cols = max(1, min(len(cols), (MAX_WIDTH - label_width - PAD) // CELL)) if cols else 1
    n_panels = max(1, math.ceil(len(cols) / panel_cols)) if cols else 0
    title_y, legend_y = PAD, PAD + line + 4
    top = legend_y + line + 2 * PAD
    panel_tops = []
    for _ in range(n_panels):
        panel_tops.append(top + col_label_height)
        top = panel_tops[-1] + len(rows) * CELL + 2 * PAD
    grid_width = label_width + min(len(cols), panel_cols) * CELL + PAD
    legend_width = 2 * PAD + 160 + 40 + _text_size(font, "no shared layer")[0] + 40
    message_width = _text_size(font, EMPTY_MESSAGE)[0] + 2 * PAD if not (rows and cols) else 0
    width = min(MAX_WIDTH, max(grid_width, _text_size(font, title)[0] + 2 * PAD, legend_width, message_width))
    height = top + (line + PAD if not (rows and cols) else 0)
    return HeatmapLayout(width, height, title_y, legend_y, label_width, col_label_height, panel_cols,
                         panel_tops, len(rows), len(cols))


def _grid(rows: Sequence[str], cols: Sequence[str], values) -> torch.Tensor:
    if not rows or not cols:
        return torch.zeros(len(rows), len(cols), dtype=torch.float64)
    try:
        grid = torch.as_tensor(values, dtype=torch.float64)
    except (ValueError, TypeError) as e:
        raise LoRASettingsError(f"heatmap values must be a {len(rows)} x {len(cols)} table of numbers: {e}") from e
    if tuple(grid.shape) != (len(rows), len(cols)):
        raise LoRAShapeError(f"heatmap values are {tuple(grid.shape)} but there are {len(rows)} rows "
                         f"and {len(cols)} columns")
    return grid


# The last few images drawn: a Stack LoRA re-run after a strength change has the same cosines.
_RECENT: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_RECENT_SIZE = 8
caches.register("heatmaps", _RECENT.clear)


def render_heatmap(rows: Sequence[str], cols: Sequence[str], values, title: str = DEFAULT_TITLE,
                   show_values: bool = True) -> torch.Tensor:
    """rows (pair labels like 'A x B') x cols (block names) of cosines in [-1, 1], NaN = none shared."""
    grid = _grid(rows, cols, values)
    key = (tuple(rows), tuple(cols), title, show_values,
           tuple(None if math.isnan(v) else round(v, 6) for v in grid.flatten().tolist()))
    if key in _RECENT:
        _RECENT.move_to_end(key)
        return _RECENT[key].clone()
    image = _draw(rows, cols, grid, title, show_values)
    _RECENT[key] = image
    while len(_RECENT) > _RECENT_SIZE:
        _RECENT.popitem(last=False)
    return image.clone()


def _draw(rows: Sequence[str], cols: Sequence[str], grid: torch.Tensor, title: str, show_values: bool
          ) -> torch.Tensor:
    layout = heatmap_layout(rows, cols, title)
    font = _font()
    image = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, layout.title_y), title, fill=TEXT, font=font)
    _legend(draw, font, layout.legend_y)
    if not rows or not cols:
        draw.text((PAD, layout.legend_y + 2 * (_text_size(font, "Ag0")[1] + 4) + PAD),
                  EMPTY_MESSAGE, fill=TEXT, font=font)
    else:
        _cells(draw, font, layout, grid, show_values)
        _labels(image, draw, font, layout, rows, cols)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(layout.height, layout.width, 3).to(torch.float32).div_(255.0).unsqueeze(0)


def _centred(draw, font, box, text, fill) -> None:
    w, h, ox, oy = _text_size(font, text)
    x0, y0, x1, y1 = box
    draw.text(((x0 + x1 - w) / 2 - ox, (y0 + y1 - h) / 2 - oy), text, fill=fill, font=font)


def _legend(draw, font, y: int) -> None:
    x, bar = PAD, 160
    h = _text_size(font, "Ag0")[1] + 2
    draw.text((x, y), "-1", fill=TEXT, font=font)
    x += _text_size(font, "-1 ")[0] + 4
    for i in range(bar):
        draw.line([(x + i, y), (x + i, y + h)], fill=colour_of(-1 + 2 * i / (bar - 1)))
    x += bar + 4
    draw.text((x, y), "+1", fill=TEXT, font=font)
    x += _text_size(font, "+1")[0] + 16
    draw.rectangle([x, y, x + h, y + h], fill=MISSING)
    draw.text((x + h + 6, y), "no shared layer", fill=TEXT, font=font)


def _cells(draw, font, layout: HeatmapLayout, grid: torch.Tensor, show_values: bool) -> None:
    for r in range(layout.n_rows):
        for c in range(layout.n_cols):
            value = float(grid[r, c])
            x0, y0, x1, y1 = layout.cell_box(r, c)
            fill = colour_of(value)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill, outline=GRID_LINE)
            if show_values and not math.isnan(value):
                text = "0.00" if abs(value) < 0.005 else f"{value:.2f}"
                ink = (255, 255, 255) if abs(value) > 0.6 else TEXT  # stay legible on dark cells
                _centred(draw, font, (x0, y0, x1, y1), text, ink)


def _labels(image, draw, font, layout: HeatmapLayout, rows, cols) -> None:
    for panel, top in enumerate(layout.panel_tops):
        for r, label in enumerate(rows):
            w, h, ox, oy = _text_size(font, _short(label))
            y = top + r * CELL + (CELL - h) / 2 - oy
            draw.text((layout.label_width - PAD - w - ox, y), _short(label), fill=TEXT, font=font)
        first = panel * layout.panel_cols
        for c in range(first, min(first + layout.panel_cols, layout.n_cols)):
            label = _short(cols[c])
            w, h, ox, oy = _text_size(font, label)
            tile = Image.new("RGB", (max(1, w), max(1, h)), BACKGROUND)
            ImageDraw.Draw(tile).text((-ox, -oy), label, fill=TEXT, font=font)
            tile = tile.rotate(90, expand=True)  # reads bottom to top, ending at the grid
            x0, y0, _, _ = layout.cell_box(0, c)
            image.paste(tile, (x0 + (CELL - tile.width) // 2, y0 - PAD // 2 - tile.height))
