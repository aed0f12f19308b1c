"""Issue 19.1: a job's charges folded as they are recorded give the same figures as composing
every row afresh, and a read after round n reads only what was written since."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.domain import ChargedEvent
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from orchestrator.core.store import ChargeRow, JobRow, Store
from orchestrator.jobs import accounting
from orchestrator.jobs.accounting import Accounts, JobAccount

DELTA = 1e-5


def _job(store: Store, job_id: str = "job-1") -> None:
    store.add_job(
        JobRow(
            job_id=job_id,
            name="",
            dataset="d",
            spec_json="{}",
            state="running",
            round=0,
            rounds=3,
            epsilon=0.0,
            delta=DELTA,
            accountant="prv",
            created_at=0.0,
            updated_at=0.0,
            participants={},
        )
    )


def _charge(
    rnd: int, site: str, events: list[tuple[str, DpEvent]], *, dataset: str = "d", n: int = 100
) -> ChargeRow:
    return accounting.charge_row(
        job_id="job-1",
        round=rnd,
        site_id=site,
        dataset=dataset,
        task_id=f"{site}-{rnd}-{dataset}",
        events=events,
        delta=DELTA,
        num_examples=n,
        max_grad_norm=1.0,
        dataset_epsilon=0.1 * rnd,
    )


A = DpEvent(1.0, 0.05, 20)
B = DpEvent(0.9, 0.1, 10)
M = DpEvent(5.0, 1.0, 1)


def test_folded_rows_give_the_exact_epsilon_of_every_event(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _job(store)
    account = JobAccount("job-1", delta=DELTA)
    for rnd in (1, 2, 3):
        store.add_charges([_charge(rnd, "a", [("train", A), ("metrics", M)])])
        store.add_charges([_charge(rnd, "b", [("train", B)])])
        account.sync(store)
    exact = account.exact()
    assert exact.per_site["a"] == compute_epsilon([A, M] * 3, delta=DELTA)
    assert exact.per_site["b"] == compute_epsilon([B] * 3, delta=DELTA)
    assert exact.epsilon == max(exact.per_site["a"].epsilon, exact.per_site["b"].epsilon)
    assert exact.accountant == "prv"
    # The same as composing the rows afresh (accounting.job_epsilon, for rows in hand).
    fresh = accounting.job_epsilon(store.charges("job-1"), delta=DELTA)
    assert fresh.site_epsilons() == exact.site_epsilons()
    # The running bound is sound and within its documented ~2% of exact.
    running = account.running()
    for sid, bound in exact.per_site.items():
        assert bound.epsilon <= running.per_site[sid].epsilon <= 1.03 * bound.epsilon


def test_a_sync_folds_each_row_once_and_reads_only_new_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    _job(store)
    accounts = Accounts(store)
    store.add_charges([_charge(1, "a", [("train", A)])])
    first = accounts.of("job-1", delta=DELTA)
    read: list[int] = []
    charges = store.charges

    def counted(job_id: str | None = None, *, after_id: int = 0) -> list[ChargeRow]:
        rows = charges(job_id, after_id=after_id)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(store, "charges", counted)
    assert accounts.of("job-1", delta=DELTA) is first  # one account per job
    store.add_charges([_charge(2, "a", [("train", A)])])
    accounts.of("job-1", delta=DELTA)
    accounts.of("job-1", delta=DELTA)
    assert read == [0, 1, 0]
    (spend,) = first.spends({})
    assert spend.steps == 2 * A.steps  # not folded twice
    assert first.histories() == {"a": [DpEvent(A.noise_multiplier, A.sample_rate, 2 * A.steps)]}


def test_spends_and_ledger_rows_state_each_sites_totals(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _job(store)
    store.add_charges([_charge(1, "b", [("metrics", M)], n=50)])  # e.g. quantile edges
    store.add_charges([_charge(1, "a", [("train", A), ("metrics", M)])])
    store.add_charges([_charge(2, "a", [("train", B)], n=120)])
    store.add_charges([_charge(2, "b", [("train", A)], dataset="other")])
    account = JobAccount("job-1", delta=DELTA).sync(store)
    a, b = account.spends({"a": 1.5})
    assert (a.site_id, a.num_examples, a.steps, a.epsilon) == ("a", 120, A.steps + B.steps, 1.5)
    assert (a.noise_multiplier, a.sample_rate) == (B.noise_multiplier, B.sample_rate)
    assert a.dataset_epsilon == pytest.approx(0.2)
    assert a.events == (
        ChargedEvent("train", A),
        ChargedEvent("metrics", M),
        ChargedEvent("train", B),
    )
    assert (b.steps, b.epsilon, b.noise_multiplier) == (A.steps, 0.0, A.noise_multiplier)
    rows = account.ledger_rows({"a": 1.5, "b": 2.0})
    assert [(r.site_id, r.dataset, r.rounds) for r in rows] == [
        ("a", "d", 2),
        ("b", "d", 1),
        ("b", "other", 1),
    ]
    assert rows[0].epsilon == 1.5 and rows[2].epsilon == 2.0
    assert math.isnan(account.ledger_rows({})[0].epsilon)  # unknown ε is said, not zero
    assert rows[2].events == (ChargedEvent("train", A),)
