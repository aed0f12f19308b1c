"""The check every number read from the wire goes through."""

from __future__ import annotations

import math

from common.errors import InvalidSpecError


def finite(name: str, x: float) -> float:
    """``x`` as a float; an ``InvalidSpecError`` naming ``name`` when it is NaN or infinite."""
    if not math.isfinite(x):
        raise InvalidSpecError(f"{name} must be a finite number")
    return float(x)
