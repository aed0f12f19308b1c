"""What a privacy ledger records: one frozen :class:`DpEvent` per release, and its dict form.

A :class:`DpEvent` ``(σ, q, steps)`` is ``steps`` compositions of the Poisson-subsampled
Gaussian mechanism with L2 sensitivity 1 and noise multiplier σ at sample rate q; ``q == 1``
is the plain Gaussian mechanism. :func:`event_to_dict` / :func:`event_from_dict` are the one
JSON form (job ledgers, checkpoints, model cards). What is accounted, and why events with the
same ``(σ, q)`` may be merged: ``docs/accounting.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Final, TypedDict

__all__ = [
    "MIN_NOISE_MULTIPLIER",
    "DpEvent",
    "DpEventDict",
    "check_events",
    "event_from_dict",
    "event_to_dict",
    "merge_events",
]

MIN_NOISE_MULTIPLIER: Final = 0.01
"""Below this no accountant gives a meaningful bound, and the RDP arithmetic under- or
overflows (σ ≈ 1e-160 never returns in Opacus' fractional-α series)."""


@dataclass(frozen=True)
class DpEvent:
    """One self-composed Poisson-subsampled Gaussian mechanism.

    ``steps`` compositions of noise multiplier σ at sample rate q. ``q == 1.0`` is the plain
    Gaussian mechanism (e.g. a noised metric release with L2 sensitivity 1 and noise std σ).
    Raises ``ValueError`` unless σ ≥ :data:`MIN_NOISE_MULTIPLIER` is finite, q ∈ (0, 1] and
    ``steps`` is an integer ≥ 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, Real):
            raise ValueError(f"The noise multiplier must be a number, got {sigma!r}.")
        if not (math.isfinite(sigma) and sigma >= MIN_NOISE_MULTIPLIER):
            raise ValueError(
                f"The noise multiplier must be finite and at least {MIN_NOISE_MULTIPLIER}, "
                f"got {sigma}."
            )
        if isinstance(q, bool) or not isinstance(q, Real):
            raise ValueError(f"The sample rate must be a number, got {q!r}.")
        if not (math.isfinite(q) and 0 < q <= 1):
            raise ValueError(f"The sample rate must be in (0, 1], got {q}.")
        if isinstance(steps, bool) or not isinstance(steps, Integral):
            raise ValueError(f"The number of steps must be an integer, got {steps!r}.")
        if steps < 1:
            raise ValueError(f"The number of steps must be at least 1, got {steps}.")
        # Normalise numpy scalars so events hash, compare and serialise as plain Python values.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))


def check_events(events: Iterable[object]) -> list[DpEvent]:
    """``events`` as a list, or ``ValueError`` naming the first item that is not a DpEvent."""
    checked: list[DpEvent] = []
    for e in events:
        if not isinstance(e, DpEvent):
            raise ValueError(f"Expected DpEvent instances, got {type(e).__name__}.")
        checked.append(e)
    return checked


def merge_events(events: Sequence[DpEvent]) -> list[DpEvent]:
    """Events with identical (σ, q) merged (steps summed), sorted by (σ, q).

    Exact: self-composition is composition, so every accountant gives the merged history the
    same ε. Raises ``ValueError`` on an item that is not a :class:`DpEvent`.
    """
    steps: dict[tuple[float, float], int] = {}
    for e in check_events(events):
        key = (e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return [DpEvent(s, q, n) for (s, q), n in sorted(steps.items())]


class DpEventDict(TypedDict):
    """The dict form of a :class:`DpEvent` (:func:`event_to_dict`)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def event_to_dict(event: DpEvent) -> DpEventDict:
    """``{"noise_multiplier": σ, "sample_rate": q, "steps": steps}`` (JSON-ready)."""
    return {
        "noise_multiplier": event.noise_multiplier,
        "sample_rate": event.sample_rate,
        "steps": event.steps,
    }


def event_from_dict(data: Mapping[str, object]) -> DpEvent:
    """The inverse of :func:`event_to_dict`; other keys are ignored.

    Raises ``ValueError`` when a key is missing, a value is not a number (or a numeric
    string, as JSON written by hand may hold), ``steps`` is not a whole number, or the event
    itself is invalid (:class:`DpEvent`).
    """
    missing = [k for k in ("noise_multiplier", "sample_rate", "steps") if k not in data]
    if missing:
        raise ValueError(f"A DP event needs {', '.join(missing)}; got keys {sorted(data)}.")
    sigma = _number(data["noise_multiplier"], "noise_multiplier")
    q = _number(data["sample_rate"], "sample_rate")
    raw_steps = data["steps"]
    if isinstance(raw_steps, Integral) and not isinstance(raw_steps, bool):
        steps = int(raw_steps)
    else:
        whole = _number(raw_steps, "steps")
        if not whole.is_integer():
            raise ValueError(f"The DP event's steps must be a whole number, got {raw_steps!r}.")
        steps = int(whole)
    return DpEvent(sigma, q, steps)


def _number(raw: object, key: str) -> float:
    if not isinstance(raw, bool) and isinstance(raw, Real | str):
        try:
            return float(raw)
        except (ValueError, OverflowError):
            pass
    raise ValueError(f"The DP event's {key} must be a number, got {raw!r}.")
