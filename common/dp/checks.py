"""Argument checks the accountants share: δ in (0, 1), and a usable (finite, ≥ 0) ε."""

from __future__ import annotations

import math

from common.errors import PrivacyAccountingError


def check_delta(delta: float) -> None:
    """``ValueError`` unless ``delta`` is a number in (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"δ must be a number, got {delta!r}.")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"δ must be in (0, 1), got {delta}.")


def finite_epsilon(value: float, what: str) -> float:
    """``value`` as a float, or :class:`PrivacyAccountingError` when it is NaN, infinite or
    negative (no release may rest on it); ``what`` names the accountant in the message."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise PrivacyAccountingError(
            f"The {what} accountant returned ε = {v}, which is not a usable bound; "
            "nothing may be released on it."
        )
    return v
