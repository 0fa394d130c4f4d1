"""Figures built from data, returned as matplotlib Figures: the caller saves, embeds or logs
them. The style every figure shares lives here: resolution, colours, panel grids."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

DPI = 110  # every saved figure's resolution
SAVE_KWARGS = {"dpi": DPI, "bbox_inches": "tight"}


def png_bytes(figure: Figure, **save_kwargs: object) -> bytes:
    """A figure as PNG bytes, at `DPI` unless told otherwise."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **{"dpi": DPI, **save_kwargs})
    return buffer.getvalue()


def colour_of(names: list[str]) -> dict[str, str]:
    """One colour per phenotyper, the same in every figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def grid(count: int, columns: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure with `count` panels, `columns` a row; unused panels hidden."""
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]
