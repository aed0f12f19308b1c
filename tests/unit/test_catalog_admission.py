"""Issue 16.3: the catalog's DP row count goes through admission (σ floor, budget with every
reservation), is withheld when it cannot be paid for, and is never charged again."""

from __future__ import annotations

from pathlib import Path

from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from site_agent.boundary.ledger import Ledger
from site_agent.config import Policy
from site_agent.data.catalog import WITHHELD, CatalogCounts

DATA = {"d": "file:/data/d.csv", "alias": "file:/data/d.csv"}


def test_a_count_below_the_sigma_floor_is_withheld(tmp_path: Path) -> None:
    policy = Policy(max_epsilon=100, delta=1e-5, catalog_noise_multiplier=0.3)
    with Ledger(tmp_path / "l.sqlite") as led:
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 1000) == WITHHELD
        assert led.entries() == []


def test_a_count_the_budget_cannot_pay_for_is_withheld(tmp_path: Path) -> None:
    # σ = 0.6 passes the floor (0.5) but costs ε ≈ 8 at δ = 1e-5; the budget is 1.
    policy = Policy(max_epsilon=1, delta=1e-5, catalog_noise_multiplier=0.6)
    with Ledger(tmp_path / "l.sqlite") as led:
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 1000) == WITHHELD
        assert led.entries() == []


def test_a_reservation_is_not_spent_on_the_count(tmp_path: Path) -> None:
    two = rdp_epsilon([DpEvent(20.0, 1.0, 2)], delta=1e-5)
    three = rdp_epsilon([DpEvent(20.0, 1.0, 3)], delta=1e-5)
    # The job holds two releases' worth; the count would be a third.
    policy = Policy(max_epsilon=(two + three) / 2, delta=1e-5, catalog_noise_multiplier=20.0)
    with Ledger(tmp_path / "l.sqlite") as led:
        led.reserve(
            dataset="d",
            job_id="job-1",
            per_round=[("train", DpEvent(20.0, 1.0, 1))],
            rounds=2,
            delta=1e-5,
            check=lambda history: None,
        )
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 1000) == WITHHELD
        led.release(dataset="d", job_id="job-1", reason="test")
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 1000) != WITHHELD


def test_released_once_per_budget_whatever_the_data_does(tmp_path: Path) -> None:
    policy = Policy(max_epsilon=10, delta=1e-5, catalog_noise_multiplier=20.0)
    with Ledger(tmp_path / "l.sqlite", budgets=DATA) as led:
        counts = CatalogCounts(tmp_path, led, policy, budget_limit=lambda name: 10.0)
        first = counts.noisy_count("d", 1000)
        assert first >= 0
        assert counts.noisy_count("d", 1200) == first  # the data changed: no new charge
        assert counts.noisy_count("alias", 1000) == first  # same file, same budget
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 5) == first  # restart
        assert len(led.entries()) == 1
