"""common.dp.running: a dominating history's bound, against the exact one (issue 19.1)."""

from __future__ import annotations

import math

import pytest

import common.dp.accounting as acc
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.dp.running import dominating_history, round_up_steps, running_epsilon


def test_step_grid_rounds_up_by_at_most_one_grid_ratio() -> None:
    ratio = 2 ** (1 / 32)
    for k in range(1, 5000):
        up = round_up_steps(k)
        assert up >= k
        assert up <= math.ceil(k * ratio) + 1
        assert round_up_steps(up) == up  # grid points are fixed points
    assert [round_up_steps(k) for k in range(1, 33)] == list(range(1, 33))


def test_dominating_history_merges_and_rounds_up() -> None:
    events = [DpEvent(1.0, 0.05, 1)] * 100 + [DpEvent(5.0, 1.0, 1)] * 3
    assert dominating_history(events) == [
        DpEvent(1.0, 0.05, round_up_steps(100)),
        DpEvent(5.0, 1.0, 3),
    ]


@pytest.mark.parametrize("steps", [7, 45, 200])
def test_bound_is_above_the_exact_one_and_close(steps: int) -> None:
    events = [DpEvent(1.0, 32 / 431, 1)] * steps + [DpEvent(10.0, 1.0, 1)]
    exact = compute_epsilon(events, delta=1e-5).epsilon
    running = running_epsilon(events, delta=1e-5)
    assert exact <= running.epsilon <= exact * 1.025
    assert running.accountant == "prv"


def test_later_rounds_are_mostly_answered_from_the_cache() -> None:
    """Rounds 190-200 of a one-event history: a composition only where the steps cross a
    grid point (every ~2.2%), 4 of the 11 rounds at most; the others come from the cache."""
    acc._compute_merged.cache_clear()
    for k in range(190, 201):
        running_epsilon([DpEvent(1.0, 32 / 431, 1)] * k, delta=1e-5)
    assert acc._compute_merged.cache_info().misses <= 4
