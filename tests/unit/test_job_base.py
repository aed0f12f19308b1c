"""The job skeleton (``orchestrator.jobs.base``): waiting with a deadline, cancellation and
shutdown; charges written before a task is dispatched; an ended job is never run again."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from common.domain import TaskAssignment, TaskFailure
from common.dp.events import DpEvent
from common.errors import JobFailedError
from orchestrator.core.broker import FailureResult
from orchestrator.core.store import JobRow, Store
from orchestrator.jobs.base import JobStopped, JobThread

DELTA = 1e-5


class _Broker:
    """Answers every task with a failure; records what the job ledger held at dispatch."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.charged_at_dispatch: list[int] = []

    def dispatch_into(self, site_id: str, task: TaskAssignment, blob: Any, out: Any) -> None:
        self.charged_at_dispatch.append(len(self.store.charges(self.job_id)))
        out.put(FailureResult(_failure(site_id, task.task_id)))

    def cancel(self, task_ids: list[str]) -> None:
        pass

    def check_liveness(self, task_ids: list[str]) -> None:
        pass


def _failure(site_id: str, task_id: str) -> TaskFailure:
    return TaskFailure(site_id=site_id, task_id=task_id, code="UNAVAILABLE", reason="test")


class _Job(JobThread):
    ran = False

    def _run(self) -> None:
        self.ran = True


def _job(tmp_path: Path, state: str = "running") -> tuple[_Job, Store, _Broker]:
    store = Store(tmp_path)
    store.add_job(
        JobRow(
            job_id="job-1",
            name="",
            dataset="d",
            spec_json="{}",
            state=state,
            round=0,
            rounds=1,
            epsilon=0.0,
            delta=DELTA,
            accountant="prv",
            created_at=0.0,
            updated_at=0.0,
            participants={},
        )
    )
    broker = _Broker(store, "job-1")
    job = _Job(
        job_id="job-1",
        store=store,
        broker=broker,  # type: ignore[arg-type]
        on_change=lambda _: None,
        stopping=threading.Event(),
        poll_s=0.01,
    )
    return job, store, broker


def test_wait_polls_until_ready_and_announces_once(tmp_path: Path) -> None:
    job, store, _ = _job(tmp_path)
    polls = iter([None, None, "ready"])
    got = job._wait(
        lambda: next(polls), timeout_s=5, on_timeout=lambda: "late", waiting=lambda: "w"
    )
    assert got == "ready"
    assert [e.message for e in store.events("job-1")] == ["w"]


def test_wait_ends_at_the_deadline_at_cancellation_and_at_shutdown(tmp_path: Path) -> None:
    job, _, _ = _job(tmp_path)
    assert job._wait(lambda: None, timeout_s=0.02, on_timeout=lambda: "late") == "late"
    job.cancel("alice")
    with pytest.raises(JobFailedError, match="cancelled by alice"):
        job._wait(lambda: None, timeout_s=5, on_timeout=lambda: "late")
    job2, _, _ = _job(tmp_path / "2")
    job2.stopping.set()
    with pytest.raises(JobStopped):
        job2._wait(lambda: None, timeout_s=5, on_timeout=lambda: "late")


def test_send_writes_every_sites_charge_before_any_task_is_dispatched(tmp_path: Path) -> None:
    job, _, broker = _job(tmp_path)
    res = job._send(
        ["a", "b"],
        1,
        kind="gmm",
        dataset="d",
        delta=DELTA,
        request_json="{}",
        events=[("metrics", DpEvent(2.0, 1.0, 1))],
        timeout_s=5,
    )
    assert broker.charged_at_dispatch == [2, 2]  # both charges were in the ledger first
    assert set(res.failures) == {"a", "b"} and not res.updates
    assert set(job.account.site_ids()) == {"a", "b"}  # and folded into the job's account
    assert job.account.exact().epsilon > 0


@pytest.mark.parametrize("state", ["completed", "failed"])
def test_an_ended_job_is_never_run_again(tmp_path: Path, state: str) -> None:
    job, store, _ = _job(tmp_path, state)
    job.run()
    assert not job.ran and store.job("job-1").state == state


def test_a_failure_fails_the_job_visibly(tmp_path: Path) -> None:
    class Broken(_Job):
        def _run(self) -> None:
            raise RuntimeError("boom")

    _, store, broker = _job(tmp_path)
    job = Broken(
        job_id="job-1",
        store=store,
        broker=broker,  # type: ignore[arg-type]
        on_change=lambda _: None,
        stopping=threading.Event(),
    )
    job.run()
    row = store.job("job-1")
    assert row.state == "failed" and "RuntimeError: boom" in (row.error or "")


def test_quantile_edges_are_charged_before_the_request_is_sent(tmp_path: Path) -> None:
    """The DP quantile release (before round 1) is charged write-ahead like every release:
    sites that never answer are counted, and the ledger row names the task that was sent."""
    from common.domain import ColumnInfo
    from common.schema.encoding import derive_encoding, uniform_edges
    from common.specs import parse_job_spec
    from orchestrator.training.quantiles import release_quantile_edges

    income = ColumnInfo("income", "numeric", min=0.0, max=1000.0, nullable=True)
    label = ColumnInfo("status", "categorical", categories=("good", "bad"), nullable=False)
    enc = derive_encoding(
        [income], label, numeric="quantile", edges={"income": uniform_edges(0.0, 1000.0, 4)}
    ).to_dict()
    spec = parse_job_spec(
        {
            "dataset": "d",
            "model": {"kind": "linear"},
            "rounds": 2,
            "batch_size": 16,
            "dp": {"noise_multiplier": 1.0, "delta": DELTA},
            "encoding": {**enc, "bins": 4},
            "round_timeout_s": 5,
        }
    )
    job, store, broker = _job(tmp_path)
    sent: list[str] = []
    dispatch = broker.dispatch_into

    def dispatch_into(site_id: str, task: TaskAssignment, blob: Any, out: Any) -> None:
        sent.append(task.task_id)
        dispatch(site_id, task, blob, out)

    broker.dispatch_into = dispatch_into  # type: ignore[method-assign]
    with pytest.raises(JobFailedError, match="no site released quantile histograms"):
        release_quantile_edges(
            store=store,
            broker=broker,  # type: ignore[arg-type]
            job_id="job-1",
            spec=spec,
            site_ids=["a", "b"],
            check=job._abandon_if_stopped,
            event=job._event,
            charge_ahead=job._charge_ahead,
        )
    assert broker.charged_at_dispatch == [2, 2]  # both charges in the ledger first
    rows = store.charges("job-1")
    assert sorted(r.site_id for r in rows) == ["a", "b"] and {r.round for r in rows} == {0}
    assert sorted(r.task_id for r in rows) == sorted(sent)
    assert job.account.exact().epsilon > 0
