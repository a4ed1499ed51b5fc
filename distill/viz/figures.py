"""Figures on matplotlib's Agg canvas, saved atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill.checkpoint import atomic_write

DPI = 100  # figure inches * DPI = PNG pixels: sizes below are chosen in pixels


def new_figure(width_px: int, height_px: int, layout: str | None = "constrained") -> Figure:
    """A figure of ``width_px`` x ``height_px`` pixels on its own Agg canvas (constrained layout:
    titles, legends and panels never overlap)."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path`` (temporary name, then rename: never half a file).

    No ``bbox_inches="tight"``: the PNG keeps the figure's pixel size, so a data point maps to a
    known PNG pixel (:func:`png_pixel`).
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.chmod(tmp, 0o644)  # a picture to look at, not a private temporary (mkstemp makes 0600)

    atomic_write(path, write)
    return path


def png_pixel(ax, x: float, y: float) -> tuple[int, int]:
    """(column, row) of the saved PNG's pixel showing data point (x, y) of ``ax``."""
    fig = ax.figure
    fig.canvas.draw()  # lays the axes out as savefig will
    dx, dy = ax.transData.transform((x, y))
    height = round(fig.get_figheight() * DPI)
    return int(dx), int(height - dy)
