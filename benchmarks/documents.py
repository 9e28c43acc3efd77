"""Rendered document pages with their ground truth: layout blocks and text-line boxes.

The document models of benchmarks/build_document_models.py (text detector, layout detector,
orientation classifier) need pages, not lines. Each page is laid out like a report or an
article: an optional running header and page number, a title, one or two columns of
paragraphs of real English prose (docstring sentences of pinned packages), figures (photos
shipped in scikit-image and scikit-learn) with captions, ruled tables of numbers with
captions, and centered equations. Everything is drawn with Pillow in the fonts matplotlib
ships, from a seeded generator, so a page is the same on every build.

Block kinds are the ten classes of the CDLA layout data set, which the layout detector
predicts; only the ones a page can hold are drawn (no 'reference').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BODY_FONTS = ("DejaVuSerif.ttf", "DejaVuSans.ttf", "STIXGeneral.ttf")
BOLD_FONTS = {
    "DejaVuSerif.ttf": "DejaVuSerif-Bold.ttf",
    "DejaVuSans.ttf": "DejaVuSans-Bold.ttf",
    "STIXGeneral.ttf": "STIXGeneralBol.ttf",
}
ITALIC_FONTS = {
    "DejaVuSerif.ttf": "DejaVuSerif-Italic.ttf",
    "DejaVuSans.ttf": "DejaVuSans-Oblique.ttf",
    "STIXGeneral.ttf": "STIXGeneralItalic.ttf",
}
TABLE_HEADINGS = ("Model", "Size", "Time", "Score", "Count", "Mean", "Error", "Rate", "Year")
EQUATIONS = (
    "y = a x + b",
    "f(x) = 3.2 x - 7.1",
    "E = m c^2",
    "p(x) = exp(-x / 2) / Z",
    "L = (y - w x)^2 + c |w|",
    "s = 0.5 (u + v) t",
    "x(t) = A cos(w t + p)",
    "H = - sum p log p",
)


@dataclasses.dataclass(frozen=True)
class Block:
    """One layout element: its CDLA class name and its box (x0, y0, x1, y1) in page pixels."""

    kind: str
    box: tuple[int, int, int, int]


@dataclasses.dataclass
class Page:
    """A rendered page as BGR uint8 (cv2's order, which the rapid* packages expect)."""

    image: np.ndarray
    blocks: list[Block]
    lines: list[tuple[int, int, int, int]]


@dataclasses.dataclass(frozen=True)
class PageSources:
    """What pages are made of: font folder, prose sentences and photos (RGB uint8)."""

    font_directory: Path
    sentences: Sequence[str]
    photos: Sequence[np.ndarray]


class _Canvas:
    """A page being drawn: the image, a pen, and the ground truth collected so far."""

    def __init__(self, width: int, height: int, paper: int, ink: int) -> None:
        self.image = Image.new("RGB", (width, height), (paper, paper, paper))
        self.draw = ImageDraw.Draw(self.image)
        self.ink = (ink, ink, ink)
        self.blocks: list[Block] = []
        self.lines: list[tuple[int, int, int, int]] = []

    def text_line(self, x: int, y: int, text: str, font: ImageFont.FreeTypeFont) -> tuple[int, ...]:
        """Draw one line with its top-left ink corner near (x, y); returns its ink box."""
        left, top, right, bottom = font.getbbox(text)
        self.draw.text((x - left, y - top), text, font=font, fill=self.ink)
        box = (x, y, x + right - left, y + bottom - top)
        self.lines.append(box)
        return box

    def block(self, kind: str, boxes: Sequence[Sequence[int]]) -> None:
        if boxes:
            self.blocks.append(
                Block(
                    kind,
                    (
                        min(box[0] for box in boxes),
                        min(box[1] for box in boxes),
                        max(box[2] for box in boxes),
                        max(box[3] for box in boxes),
                    ),
                )
            )


def _wrap(words: Sequence[str], font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    current: list[str] = []
    for word in words:
        candidate = " ".join([*current, word])
        if current and font.getlength(candidate) > width:
            lines.append(" ".join(current))
            current = [word]
        else:
            current.append(word)
    if current:
        lines.append(" ".join(current))
    return lines


class _Layout:
    """Fills a page top to bottom, column by column, with blocks drawn by _Canvas."""

    def __init__(self, canvas: _Canvas, sources: PageSources, rng: np.random.Generator) -> None:
        self.canvas = canvas
        self.sources = sources
        self.rng = rng
        width = canvas.image.size[0]
        self.body_size = int(rng.integers(max(11, width // 70), max(13, width // 42) + 1))
        family = BODY_FONTS[int(rng.integers(len(BODY_FONTS)))]
        self.font = self._font(family, self.body_size)
        self.bold = self._font(BOLD_FONTS[family], self.body_size)
        self.small = self._font(family, max(9, round(self.body_size * 0.8)))
        self.italic = self._font(ITALIC_FONTS[family], self.body_size)
        self.title_font = self._font(
            BOLD_FONTS[family], round(self.body_size * rng.uniform(1.5, 2.2))
        )
        self.leading = round(self.body_size * rng.uniform(1.25, 1.6))
        self.margin = round(width * rng.uniform(0.06, 0.11))
        self.gap = self.leading
        self.figures = 0
        self.tables = 0

    def _font(self, name: str, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(self.sources.font_directory / name), size)

    def _sentence(self) -> str:
        return self.sources.sentences[int(self.rng.integers(len(self.sources.sentences)))]

    def fill(self) -> None:
        width, height = self.canvas.image.size
        top, bottom = self.margin, height - self.margin
        if self.rng.random() < 0.7:
            top = self._header(top) + self.gap
        if self.rng.random() < 0.7:
            bottom = self._footer(bottom) - self.gap
        if self.rng.random() < 0.6:
            top = self._title(top, width) + self.gap
        columns = 2 if width > 500 and self.rng.random() < 0.4 else 1
        column_gap = round(self.body_size * 1.5)
        column_width = (width - 2 * self.margin - (columns - 1) * column_gap) // columns
        for column in range(columns):
            x = self.margin + column * (column_width + column_gap)
            self._column(x, top, column_width, bottom)

    def _header(self, top: int) -> int:
        text = " ".join(self._sentence().split()[: int(self.rng.integers(2, 6))]).rstrip(".,;")
        box = self.canvas.text_line(self.margin, top, text, self.small)
        self.canvas.block("header", [box])
        return box[3]

    def _footer(self, bottom: int) -> int:
        text = str(int(self.rng.integers(1, 400)))
        width = self.canvas.image.size[0]
        left, top, right, lower = self.small.getbbox(text)
        box = self.canvas.text_line(
            (width - (right - left)) // 2, bottom - (lower - top), text, self.small
        )
        self.canvas.block("footer", [box])
        return box[1]

    def _title(self, top: int, width: int) -> int:
        words = self._sentence().rstrip(".!?").split()[: int(self.rng.integers(3, 10))]
        words = [word.capitalize() if len(word) > 3 else word for word in words]
        boxes = []
        y = top
        for line in _wrap(words, self.title_font, width - 2 * self.margin)[:2]:
            line_width = round(self.title_font.getlength(line))
            x = (width - line_width) // 2 if self.rng.random() < 0.5 else self.margin
            boxes.append(self.canvas.text_line(x, y, line, self.title_font))
            y = boxes[-1][3] + round(self.title_font.size * 0.4)
        self.canvas.block("title", boxes)
        return boxes[-1][3]

    def _column(self, x: int, top: int, width: int, bottom: int) -> None:
        y = top
        while True:
            choice = self.rng.random()
            if choice < 0.6:
                end = self._paragraph(x, y, width, bottom)
            elif choice < 0.75:
                end = self._figure(x, y, width, bottom)
            elif choice < 0.9:
                end = self._table(x, y, width, bottom)
            else:
                end = self._equation(x, y, width, bottom)
            if end is None:
                return
            y = end + self.gap

    def _paragraph(self, x: int, y: int, width: int, bottom: int) -> int | None:
        words: list[str] = []
        for _ in range(int(self.rng.integers(1, 5))):
            words += self._sentence().split()
        lines = _wrap(words, self.font, width)
        room = (bottom - y) // self.leading
        if room < 2:
            return None
        boxes = []
        for index, line in enumerate(lines[:room]):
            indent = self.body_size * 2 if index == 0 and self.rng.random() < 0.5 else 0
            if indent and self.font.getlength(line) + indent > width:
                indent = 0
            boxes.append(
                self.canvas.text_line(x + indent, y + index * self.leading, line, self.font)
            )
        self.canvas.block("text", boxes)
        return boxes[-1][3]

    def _caption(self, label: str, x: int, y: int, width: int) -> list[tuple[int, ...]]:
        words = [label, *self._sentence().split()[: int(self.rng.integers(4, 14))]]
        boxes = []
        for index, line in enumerate(_wrap(words, self.small, width)[:2]):
            boxes.append(
                self.canvas.text_line(
                    x, y + index * round(self.small.size * 1.35), line, self.small
                )
            )
        return boxes

    def _figure(self, x: int, y: int, width: int, bottom: int) -> int | None:
        photo = self.sources.photos[int(self.rng.integers(len(self.sources.photos)))]
        figure_width = round(width * self.rng.uniform(0.5, 1.0))
        figure_height = round(figure_width * photo.shape[0] / photo.shape[1])
        caption_room = 3 * self.small.size
        if y + figure_height + caption_room > bottom:
            return None
        left = x + (width - figure_width) // 2
        resized = Image.fromarray(photo).resize(
            (figure_width, figure_height), Image.Resampling.BILINEAR
        )
        self.canvas.image.paste(resized, (left, y))
        self.canvas.block("figure", [(left, y, left + figure_width, y + figure_height)])
        self.figures += 1
        captions = self._caption(
            f"Figure {self.figures}.", x, y + figure_height + self.small.size // 2, width
        )
        self.canvas.block("figure_caption", captions)
        return captions[-1][3]

    def _table(self, x: int, y: int, width: int, bottom: int) -> int | None:
        rows = int(self.rng.integers(3, 8))
        columns = int(self.rng.integers(3, 6))
        row_height = round(self.body_size * 1.7)
        caption_room = 3 * self.small.size
        if y + caption_room + rows * row_height > bottom:
            return None
        self.tables += 1
        captions = self._caption(f"Table {self.tables}.", x, y, width)
        self.canvas.block("table_caption", captions)
        top = captions[-1][3] + self.small.size // 2
        cell_width = width // columns
        headings = [
            TABLE_HEADINGS[index] for index in self.rng.permutation(len(TABLE_HEADINGS))[:columns]
        ]
        boxes = []
        for row in range(rows):
            row_top = top + row * row_height + (row_height - self.body_size) // 2
            for column in range(columns):
                if row == 0:
                    text, font = headings[column], self.bold
                else:
                    value = self.rng.uniform(0, 10 ** int(self.rng.integers(1, 4)))
                    text, font = f"{value:.{int(self.rng.integers(0, 3))}f}", self.font
                boxes.append(
                    self.canvas.text_line(x + column * cell_width + 4, row_top, text, font)
                )
        line_width = max(1, self.body_size // 12)
        table_bottom = top + rows * row_height
        for rule in (top, top + row_height, table_bottom):
            self.canvas.draw.line(
                (x, rule, x + width, rule), fill=self.canvas.ink, width=line_width
            )
        if self.rng.random() < 0.4:
            for column in range(columns + 1):
                rule_x = min(x + column * cell_width, x + width)
                self.canvas.draw.line(
                    (rule_x, top, rule_x, table_bottom), fill=self.canvas.ink, width=line_width
                )
        self.canvas.block("table", [(x, top, x + width, table_bottom + line_width)])
        return table_bottom

    def _equation(self, x: int, y: int, width: int, bottom: int) -> int | None:
        text = EQUATIONS[int(self.rng.integers(len(EQUATIONS)))]
        if y + 2 * self.leading > bottom:
            return None
        line_width = round(self.italic.getlength(text))
        box = self.canvas.text_line(
            x + (width - line_width) // 2, y + self.leading // 2, text, self.italic
        )
        self.canvas.block("equation", [box])
        return box[3] + self.leading // 2


def render_page(width: int, height: int, sources: PageSources, rng: np.random.Generator) -> Page:
    """A page of the given size, drawn from rng: light paper, dark ink, blocks in one or two columns."""
    paper = int(rng.integers(215, 256))
    ink = int(rng.integers(0, 70))
    canvas = _Canvas(width, height, paper, ink)
    _Layout(canvas, sources, rng).fill()
    rgb = np.asarray(canvas.image)
    return Page(np.ascontiguousarray(rgb[:, :, ::-1]), canvas.blocks, canvas.lines)
