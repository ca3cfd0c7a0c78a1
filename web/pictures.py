"""Pictures drawn on the server with Pillow: a contact sheet of winners and a histogram of scores."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from farm.artifacts import ArtifactPathError, ArtifactStore

BACKGROUND = (255, 255, 255)
INK = (33, 37, 41)
MUTED = (108, 117, 125)
GRID = (226, 230, 234)
AXIS = (173, 181, 189)
TILE_BG = (241, 243, 245)
PASSED = (46, 139, 87)
REJECTED = (200, 60, 60)


@dataclass(frozen=True)
class Tile:
    image_path: str | None  # relative to the artifact store
    caption: str


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` (needs FreeType, as in Pillow's wheels), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
         width: float) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(store: ArtifactStore, rel: str | None, cell: int) -> Image.Image:
    tile = Image.new("RGB", (cell, cell), TILE_BG)
    if not rel:
        return tile
    try:
        im = ImageOps.contain(store.open_image(rel), (cell, cell), method=Image.Resampling.NEAREST)
        tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    except (OSError, ArtifactPathError):
        ImageDraw.Draw(tile).line([(0, 0), (cell, cell)], fill=AXIS, width=2)
    return tile


def contact_sheet(
    store: ArtifactStore, tiles: Sequence[Tile], *, title: str, cell: int = 160, columns: int = 6
) -> bytes:
    """A grid of thumbnails (scaled to fit a cell, small images blown up) with a caption under each; a missing
    image shows as a crossed grey tile."""
    title_font, font = _font(14), _font(12)
    pad, caption_h, title_h = 10, 20, 30
    cols = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // cols))
    width = max(pad + cols * (cell + pad), 360)
    height = title_h + pad + rows * (cell + caption_h + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), _fit(draw, title, title_font, width - 2 * pad), fill=INK, font=title_font)
    if not tiles:
        draw.text((pad, title_h + pad + cell // 2 - 8), "no winners yet", fill=MUTED, font=font)
    for n, tile in enumerate(tiles):
        x = pad + (n % cols) * (cell + pad)
        y = title_h + pad + (n // cols) * (cell + caption_h + pad)
        sheet.paste(_thumbnail(store, tile.image_path, cell), (x, y))
        draw.text((x, y + cell + 4), _fit(draw, tile.caption, font, cell), fill=INK, font=font)
    return png_bytes(sheet)


def histogram(passed: Sequence[float], rejected: Sequence[float], *, title: str, bins: int = 20,
              size: tuple[int, int] = (640, 320)) -> bytes:
    """Side-by-side bars per bin: passed in green, rejected in red, over the common score range, with a
    light grid, count ticks on the left and score ticks below."""
    font, title_font = _font(11), _font(13)
    width, height = size
    left, right, top, bottom = 44, 16, 34, 30
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), _fit(draw, title, title_font, width - left - 230), fill=INK, font=title_font)
    _legend(draw, width - right, 10, [(PASSED, f"passed ({len(passed)})"),
                                     (REJECTED, f"rejected ({len(rejected)})")], font)
    values = [*passed, *rejected]
    plot_w, plot_h = width - left - right, height - top - bottom
    x_axis = top + plot_h
    if not values:
        draw.line([left, x_axis, left + plot_w, x_axis], fill=AXIS)
        draw.text((left + plot_w // 2 - 35, top + plot_h // 2 - 7), "no scores yet", fill=MUTED, font=font)
        return png_bytes(image)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    step = (hi - lo) / bins

    def counts(xs: Sequence[float]) -> list[int]:
        out = [0] * bins
        for x in xs:
            out[min(int((x - lo) / step), bins - 1)] += 1
        return out

    good, bad = counts(passed), counts(rejected)
    peak = max(max(good), max(bad), 1)
    ticks = sorted({0, peak} | ({peak // 2} if peak >= 4 else set()))
    for t in ticks:
        y = x_axis - plot_h * t / peak
        draw.line([left, y, left + plot_w, y], fill=GRID)
        label = str(t)
        draw.text((left - 6 - draw.textlength(label, font=font), y - 7), label, fill=MUTED, font=font)
    bin_w = plot_w / bins
    for b in range(bins):
        x0 = left + b * bin_w
        for offset, n, colour in ((0.08, good[b], PASSED), (0.5, bad[b], REJECTED)):
            if n:
                bar_h = plot_h * n / peak
                draw.rectangle([x0 + offset * bin_w, x_axis - bar_h, x0 + (offset + 0.42) * bin_w, x_axis],
                               fill=colour)
    draw.line([left, x_axis, left + plot_w, x_axis], fill=AXIS)
    for k in range(5):
        x = left + plot_w * k / 4
        label = f"{lo + (hi - lo) * k / 4:.3f}"
        draw.line([x, x_axis, x, x_axis + 4], fill=AXIS)
        tx = min(max(x - draw.textlength(label, font=font) / 2, 0), width - draw.textlength(label, font=font))
        draw.text((tx, x_axis + 7), label, fill=MUTED, font=font)
    return png_bytes(image)


def _legend(draw: ImageDraw.ImageDraw, right: int, y: int, entries: list[tuple[tuple[int, int, int], str]],
            font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """Swatches and labels, right-aligned at ``right``."""
    x = right
    for colour, label in reversed(entries):
        x -= draw.textlength(label, font=font)
        draw.text((x, y), label, fill=INK, font=font)
        x -= 16
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=colour)
        x -= 14
