"""Pictures drawn on the server with Pillow: a contact sheet of winners and a histogram of scores."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from farm.artifacts import ArtifactPathError, resolve_inside

BACKGROUND = (250, 250, 250)
INK = (40, 40, 40)
GRID = (215, 215, 215)
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


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _thumbnail(root: Path, rel: str | None, cell: int) -> Image.Image:
    tile = Image.new("RGB", (cell, cell), (225, 225, 225))
    if not rel:
        return tile
    try:
        with Image.open(resolve_inside(root, rel)) as im:
            im = ImageOps.contain(im.convert("RGB"), (cell, cell), method=Image.Resampling.NEAREST)
            tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    except (OSError, ArtifactPathError):
        ImageDraw.Draw(tile).line([(0, 0), (cell, cell)], fill=(180, 180, 180), width=2)
    return tile


def contact_sheet(
    root: Path, tiles: Sequence[Tile], *, title: str, cell: int = 160, columns: int = 6
) -> bytes:
    """A grid of thumbnails (scaled to fit a cell, small images blown up) with a caption under each; a missing
    image shows as a crossed grey tile."""
    font = _font()
    pad, caption_h, title_h = 8, 16, 24
    cols = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // cols))
    width = pad + cols * (cell + pad)
    height = title_h + pad + rows * (cell + caption_h + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill=INK, font=font)
    if not tiles:
        draw.text((pad, title_h + pad), "no winners yet", fill=INK, font=font)
    for n, tile in enumerate(tiles):
        x = pad + (n % cols) * (cell + pad)
        y = title_h + pad + (n // cols) * (cell + caption_h + pad)
        sheet.paste(_thumbnail(root, tile.image_path, cell), (x, y))
        draw.text((x, y + cell + 2), tile.caption[:28], fill=INK, font=font)
    return png_bytes(sheet)


def histogram(passed: Sequence[float], rejected: Sequence[float], *, title: str, bins: int = 20,
              size: tuple[int, int] = (640, 320)) -> bytes:
    """Side-by-side bars per bin: passed in green, rejected in red, over the common score range."""
    font = _font()
    width, height = size
    left, right, top, bottom = 48, 16, 28, 40
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill=INK, font=font)
    values = [*passed, *rejected]
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=GRID)
    if not values:
        draw.text((left + 10, top + plot_h // 2), "no scores yet", fill=INK, font=font)
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
    bin_w = plot_w / bins
    for b in range(bins):
        x0 = left + b * bin_w
        for offset, n, colour in ((0.1, good[b], PASSED), (0.5, bad[b], REJECTED)):
            if n:
                bar_h = plot_h * n / peak
                draw.rectangle([x0 + offset * bin_w, top + plot_h - bar_h, x0 + (offset + 0.4) * bin_w,
                                top + plot_h], fill=colour)
    draw.text((4, top), str(peak), fill=INK, font=font)
    draw.text((4, top + plot_h - 10), "0", fill=INK, font=font)
    draw.text((left, top + plot_h + 4), f"{lo:.3f}", fill=INK, font=font)
    mid_label = f"{(lo + hi) / 2:.3f}"
    draw.text((left + plot_w // 2 - 3 * len(mid_label), top + plot_h + 4), mid_label, fill=INK, font=font)
    hi_label = f"{hi:.3f}"
    draw.text((left + plot_w - 6 * len(hi_label), top + plot_h + 4), hi_label, fill=INK, font=font)
    legend_y = height - 16
    draw.rectangle([left, legend_y, left + 10, legend_y + 10], fill=PASSED)
    draw.text((left + 14, legend_y), f"passed ({len(passed)})", fill=INK, font=font)
    draw.rectangle([left + 130, legend_y, left + 140, legend_y + 10], fill=REJECTED)
    draw.text((left + 144, legend_y), f"rejected ({len(rejected)})", fill=INK, font=font)
    return png_bytes(image)
