"""Issue 16.7/16.8: one record of charges and one composition for every job kind."""

from __future__ import annotations

import pytest

from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent
from common.specs import parse_job_spec
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
