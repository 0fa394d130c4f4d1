"""Markdown pieces every written report uses: estimates with intervals, and pipe tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def estimate(value: float, low: float, high: float, difference: bool = False,
             percent: bool = False, digits: int | None = None) -> str:
    """`0.844 (0.839-0.849)`, or `84.4% (83.9-84.9)` for a share of patients; differences are
    signed (`+1.2 pp (0.4 to 2.0) *`, in percentage points for shares), starred when the
    interval excludes 0; `n/a` for an undefined value."""
    if not math.isfinite(value):
        return "n/a"
    scale = 100 if percent else 1
    digits = (1 if percent else 3) if digits is None else digits
    unit = (" pp" if difference else "%") if percent else ""
    text = f"{value * scale:{'+' if difference else ''}.{digits}f}{unit}"
    if math.isfinite(low) and math.isfinite(high):
        separator = " to " if difference or low < 0 else "-"
        text += f" ({low * scale:.{digits}f}{separator}{high * scale:.{digits}f})"
        if difference and (low > 0 or high < 0):
            text += " *"
    return text


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], labels: int = 1) -> list[str]:
    """A GitHub-style pipe table: the first `labels` columns left-aligned, the rest right."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join([":---"] * labels + ["---:"] * (len(header) - labels)) + "|"
    return [line(header), rule, *(line(row) for row in rows), ""]
