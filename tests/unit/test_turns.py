"""Turns at a limited resource: first come, first served, without a thread per waiter."""

from __future__ import annotations

import pytest

from orchestrator.core.turns import DEFAULT_GAP_S, TurnLine


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_free_place_admits_at_once_and_keeps_no_place() -> None:
    line = TurnLine(clock=Clock())
    assert line.ask("a", free=1) is None
    assert len(line) == 0


def test_a_waiter_keeps_its_place_and_is_told_when_to_come_back() -> None:
    clock = Clock()
    line = TurnLine(clock=clock)
    wait_a = line.ask("a", free=0)
    wait_b = line.ask("b", free=0)
    wait_c = line.ask("c", free=0)
    assert wait_a is not None and wait_b is not None and wait_c is not None
    assert len(line) == 3
    # Further back in the line, told to come back later.
    assert wait_a < wait_b < wait_c
    assert wait_a == pytest.approx(DEFAULT_GAP_S)


def test_first_come_first_served_among_waiters_that_are_due() -> None:
    clock = Clock()
    line = TurnLine(clock=clock)
    line.ask("a", free=0)
    line.ask("b", free=0)
    clock.t += 10 * DEFAULT_GAP_S  # both are due
    # One place frees: b asks first, but a is due and ahead of it.
    assert line.ask("b", free=1) is not None
    assert line.ask("a", free=1) is None
    assert line.ask("b", free=1) is None
    assert len(line) == 0


def test_a_waiter_not_yet_due_does_not_hold_a_free_place_back() -> None:
    clock = Clock()
    line = TurnLine(clock=clock, max_retry_s=2.0)
    for k in "abcdefgh":
        line.ask(k, free=0)
    # 'h' was told to wait longest; 'a' is due soon but not yet. A newcomer takes the free
    # place rather than leave it idle.
    assert line.ask("z", free=1) is None
    assert len(line) == 8
    # 'a', back at its time, is at the front again: a short wait, not the back of the line.
    clock.t += DEFAULT_GAP_S
    wait_a = line.ask("a", free=0)
    assert wait_a is not None and wait_a <= DEFAULT_GAP_S


def test_a_waiter_that_does_not_come_back_loses_its_place() -> None:
    clock = Clock()
    line = TurnLine(clock=clock, grace_s=1.0)
    wait = line.ask("gone", free=0)
    assert wait is not None
    line.ask("b", free=0)
    clock.t += wait + 1.5  # 'gone' missed its time by more than the grace
    assert line.ask("b", free=1) is None
    assert len(line) == 0


def test_leave_gives_up_a_place() -> None:
    line = TurnLine(clock=Clock())
    line.ask("a", free=0)
    line.leave("a")
    line.leave("never-there")
    assert len(line) == 0


def test_the_wait_follows_the_measured_interval_between_admissions() -> None:
    clock = Clock()
    line = TurnLine(clock=clock, max_retry_s=10.0)
    line.ask("x0", free=1)
    for i in range(1, 30):
        line.ask(f"w{i}", free=0)  # keeps the line busy
        clock.t += 0.5
        line.ask(f"x{i}", free=1 + len(line))  # admitted with others waiting
        line.leave(f"w{i}")
    assert line.mean_gap_s == pytest.approx(0.5, rel=0.05)
    for k in ("a", "b", "c"):
        line.ask(k, free=0)
    assert line.ask("d", free=0) == pytest.approx(4 * 0.5, rel=0.05)


def test_the_wait_stays_within_bounds() -> None:
    clock = Clock()
    line = TurnLine(clock=clock, min_retry_s=0.02, max_retry_s=0.3)
    waits = [line.ask(f"k{i}", free=0) for i in range(50)]
    assert min(w for w in waits if w is not None) >= 0.02
    assert max(w for w in waits if w is not None) <= 0.3


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        TurnLine(min_retry_s=0.0)
    with pytest.raises(ValueError):
        TurnLine(min_retry_s=2.0, max_retry_s=1.0)
