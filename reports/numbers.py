"""Numbers as gate messages and the verdict's problems show them: a count is a count (702, not 702.0)."""
from __future__ import annotations

import math


def short_number(value: float | None) -> str:
    """Short, stable numbers for tables and messages: 250, 412.3, 0.0123."""
    if value is None:
        return "—"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}"
