"""Running ε figures: a tight accountant's bound, recomputed once per step bucket.

:func:`running_epsilon` bounds the ε of a history that dominates the actual one (each merged
event's steps rounded up to a geometric grid of ratio 2^(1/32)): a sound upper bound at most
about 2% above the exact one, answered from :func:`~common.dp.accounting.compute_epsilon`'s
cache until a step count crosses a grid point. For the figures reported every round (a job's
running ε, a dataset's lifetime ε); the released ε and budget checks use the exact bound.
Soundness and cost: ``docs/accounting.md``, "Running figures".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent, merge_events

GRID_POINTS_PER_DOUBLING: Final = 32


def round_up_steps(steps: int) -> int:
    """The smallest point ``⌈2^(j/32)⌉ ≥ steps`` of the step grid (``steps`` itself up to 32)."""
    if steps <= GRID_POINTS_PER_DOUBLING:
        return steps  # the grid is denser than the integers here

    def point(j: int) -> int:
        return math.ceil(math.pow(2.0, j / GRID_POINTS_PER_DOUBLING))

    j = math.ceil(GRID_POINTS_PER_DOUBLING * math.log2(steps))
    while point(j) < steps:  # guard against rounding in log2/pow
        j += 1
    while point(j - 1) >= steps:  # the ceiling can make the point below large enough
        j -= 1
    return point(j)


def dominating_history(events: Sequence[DpEvent]) -> list[DpEvent]:
    """Events with identical (σ, q) merged, each count rounded up by :func:`round_up_steps`."""
    return [
        DpEvent(e.noise_multiplier, e.sample_rate, round_up_steps(e.steps))
        for e in merge_events(events)
    ]


def running_epsilon(
    events: Sequence[DpEvent], *, delta: float, accountant: str = "prv"
) -> EpsilonBound:
    """A sound upper bound on the ε of ``events`` at ``delta``, at most about 2% above
    :func:`~common.dp.accounting.compute_epsilon`'s, recomputed only when a step count crosses
    a grid point (see the module docstring). For figures reported every round, not for the
    released ε or a budget decision."""
    return compute_epsilon(dominating_history(events), delta=delta, accountant=accountant)
