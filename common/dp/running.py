"""Running ε figures: a tight accountant's bound that is recomputed once per step bucket.

A job's ε after each round and a dataset's lifetime ε are informational figures that grow
with every round. Composing them afresh every round with PRV costs in proportion to a grid
that widens with the history (issue 19.1). :func:`running_epsilon` reports instead the
bound of a history that *dominates* the actual one: each event's steps rounded up to the
next point of a geometric grid with ratio 2^(1/32) (at most 2.2% more steps; ε grows more
slowly than the steps, so the figure is at most about 2% above the exact bound).

Soundness: composing more steps of the same mechanism can only add privacy loss (the
actual history is a prefix of the dominating one, and an adversary's view of a prefix is a
post-processing of the whole), so a sound upper bound for the dominating history is one for
the actual history. Cost: the dominating history changes only when a step count crosses a
grid point, so once histories pass a few dozen steps, most rounds are answered from
:func:`common.dp.accounting.compute_epsilon`'s cache, and a round at step 200 costs what a
round at step 12 does.

What must be tight stays exact: the ε a model is released with, and budget checks, call
:func:`~common.dp.accounting.compute_epsilon` on the actual history.
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
