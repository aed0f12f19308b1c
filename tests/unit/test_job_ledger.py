"""Issue 16.7/16.8: one record of charges and one composition for every job kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.domain import ChargedEvent, DpReport, UpdateMeta
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent
from common.specs import parse_job_spec
from orchestrator.core.store import Store
from orchestrator.jobs import accounting
from orchestrator.training.update_bounds import Assignment, assigned_worst_case


def _row(site: str, task: str, event: DpEvent) -> object:
    return accounting.charge_row(
        job_id="job-1",
        round=1,
        site_id=site,
        dataset="d",
        task_id=task,
        events=[("train", event)],
        delta=1e-5,
    )


def test_the_released_epsilon_is_the_max_over_sites_and_names_its_accountant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = DpEvent(1.0, 0.01, 100), DpEvent(0.8, 0.02, 100)
    rows = [_row("a", "t1", a), _row("a", "t2", a), _row("b", "t3", b)]
    je = accounting.job_epsilon(rows, delta=1e-5)  # type: ignore[arg-type]
    assert je.per_site["a"].epsilon == compute_epsilon([a, a], delta=1e-5).epsilon
    assert je.epsilon == max(b.epsilon for b in je.per_site.values())
    assert je.accountant == "prv"

    def fell_back(
        events: list[DpEvent], *, delta: float, accountant: str, within_s: float | None = None
    ) -> EpsilonBound:
        return EpsilonBound(epsilon=1.0, delta=delta, accountant="pld")

    monkeypatch.setattr(accounting, "compute_epsilon", fell_back)
    assert accounting.job_epsilon(rows, delta=1e-5).accountant == "pld"  # type: ignore[arg-type]


def test_a_rejected_update_is_charged_the_most_its_task_could_cost() -> None:
    spec = parse_job_spec(
        {
            "dataset": "d",
            "model": {"kind": "linear", "input_dim": 2, "num_classes": 2},
            "rounds": 2,
            "local_epochs": 1.0,
            "batch_size": 10,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
            "audit": {"canaries": 20},
        }
    )
    a = Assignment("s", 1.0, 100, 20, spec)
    worst = dict(assigned_worst_case(a))
    for n in range(100, 121):  # every size the site may have trained on
        q, steps = a.schedule(n)
        honest = compute_epsilon([DpEvent(1.0, q, steps)], delta=1e-5).epsilon
        assert compute_epsilon([worst["train"]], delta=1e-5).epsilon >= honest


def test_one_shot_releases_are_jobs_with_charges(tmp_path: Path) -> None:
    store = Store(tmp_path)
    report = DpReport(
        events=(ChargedEvent("synth", DpEvent(5.0, 1.0, 3)),),
        max_grad_norm=0.0,
        delta=1e-5,
        task_epsilon=1.0,
        job_epsilon=1.0,
        dataset_epsilon=2.0,
        policy_delta=1e-5,
        accountant="prv",
    )
    meta = UpdateMeta("a", "task-1", 7, report, None, 0, "", "")
    accounting.record_one_shot(
        store,
        job_id="synth-1",
        kind="synth",
        dataset="d",
        delta=1e-5,
        request_json=json.dumps({"target_epsilon": 1.0}),
        answers={"a": meta},
    )
    (row,) = store.charges("synth-1")
    assert row.site_id == "a" and row.events[0]["kind"] == "synth"
    job = store.job("synth-1")
    assert job.state == "completed" and job.epsilon == pytest.approx(
        compute_epsilon([DpEvent(5.0, 1.0, 3)], delta=1e-5).epsilon
    )
    store.close()


def test_a_one_shot_release_with_assigned_events_never_charges_what_a_site_reports(
    tmp_path: Path,
) -> None:
    """An evaluation fixes each site's release (σ, one step); a site reporting less noise
    spent, or none at all, is charged the assigned event all the same."""
    store = Store(tmp_path)
    assigned = DpEvent(2.0, 1.0, 1)
    understated = DpReport(
        events=(ChargedEvent("metrics", DpEvent(500.0, 1.0, 1)),),
        max_grad_norm=0.0,
        delta=0.5,
        task_epsilon=0.001,
        job_epsilon=0.001,
        dataset_epsilon=0.001,
        policy_delta=1e-5,
        accountant="prv",
    )
    silent = DpReport((), 0.0, 0.0, 0.0, 0.0, 0.0, 1e-5, "prv")
    answers = {
        "a": UpdateMeta("a", "task-a", 7, understated, None, 0, "", ""),
        "b": UpdateMeta("b", "task-b", 9, silent, None, 0, "", ""),
    }
    eps = accounting.record_one_shot(
        store,
        job_id="eval-1",
        kind="evaluate",
        dataset="d",
        delta=1e-5,
        request_json=json.dumps({"noise_multiplier": 2.0}),
        answers=answers,
        assigned=[("metrics", assigned)],
    )
    rows = sorted(store.charges("eval-1"), key=lambda r: r.site_id)
    assert [r.site_id for r in rows] == ["a", "b"]
    for r in rows:
        assert r.delta == 1e-5
        assert [e["noise_multiplier"] for e in r.events] == [2.0]
    expected = compute_epsilon([assigned], delta=1e-5).epsilon
    assert eps is not None and eps.epsilon == pytest.approx(expected)
    assert store.job("eval-1").epsilon == pytest.approx(expected)
    store.close()
