"""``orchestrator.core.broker``: tasks reach only their site, and every task ends with one result.

Sleeps here only let a tiny ``offline_after_s`` or a long-poll run out; nothing asserts on how
long anything took.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from common.domain import ChargedEvent, DpReport, TaskAssignment, TaskFailure, UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, NotFoundError, PermissionDeniedError
from orchestrator.core.broker import Broker, FailureResult, Result, UpdateResult

MODEL = b"safetensors-bytes-of-the-global-model"
DELTA = b"safetensors-bytes-of-a-delta"


def task(task_id: str, *, round: int = 1) -> TaskAssignment:
    return TaskAssignment(
        task_id=task_id,
        job_id="job-1",
        round=round,
        rounds=3,
        job_spec_json="{}",
        dataset="credit",
        noise_multiplier=1.0,
        model_size=len(MODEL),
        model_sha256="00" * 32,
        deadline_unix=time.time() + 600,
    )


def meta(site_id: str, task_id: str, *, size: int = len(DELTA)) -> UpdateMeta:
    return UpdateMeta(
        site_id=site_id,
        task_id=task_id,
        num_examples=100,
        dp_report=DpReport(
            events=(ChargedEvent("train", DpEvent(1.0, 0.1, 10)),),
            max_grad_norm=1.0,
            delta=1e-5,
            task_epsilon=0.5,
            job_epsilon=0.5,
            dataset_epsilon=0.5,
            policy_delta=1e-5,
            accountant="prv",
        ),
        metrics=None,
        total_size=size,
        sha256="11" * 32,
    )


def dispatch(
    broker: Broker, site_id: str, assignment: TaskAssignment, model: bytes
) -> queue.Queue[Result]:
    """One task for one site, its results in a queue of their own (as a round's fan-out)."""
    results: queue.Queue[Result] = queue.Queue()
    broker.dispatch_into(site_id, assignment, model, results)
    return results


def only_result(results: queue.Queue[Result]) -> Result:
    res = results.get(timeout=5)
    assert results.empty(), "a task must produce exactly one result"
    return res


@pytest.fixture
def broker() -> Broker:
    return Broker()


# ------------------------------------------------------------------ delivery


def test_pull_returns_a_task_only_to_its_site(broker: Broker) -> None:
    sa = broker.connect("site-a")
    sb = broker.connect("site-b")
    dispatch(broker, "site-a", task("t1"), MODEL)

    assert broker.pull("site-b", sb, wait_s=0) is None
    got = broker.pull("site-a", sa, wait_s=0)
    assert got is not None and got.task_id == "t1"
    # the task is handed out once
    assert broker.pull("site-a", sa, wait_s=0) is None
    assert broker.pull("site-b", sb, wait_s=0) is None


def test_pull_delivers_the_assignment_and_its_model(broker: Broker) -> None:
    sa = broker.connect("site-a")
    t = task("t1")
    dispatch(broker, "site-a", t, MODEL)
    assert broker.pull("site-a", sa, wait_s=0) == t
    assert broker.model("site-a", "t1").read_all() == MODEL


def test_tasks_are_delivered_in_dispatch_order(broker: Broker) -> None:
    sa = broker.connect("site-a")
    for i in range(3):
        dispatch(broker, "site-a", task(f"t{i}", round=i + 1), MODEL)
    got = [broker.pull("site-a", sa, wait_s=0) for _ in range(3)]
    assert [t.task_id for t in got if t is not None] == ["t0", "t1", "t2"]


def test_a_task_dispatched_before_the_site_connects_waits_for_it(broker: Broker) -> None:
    dispatch(broker, "site-a", task("t1"), MODEL)
    sa = broker.connect("site-a")
    got = broker.pull("site-a", sa, wait_s=0)
    assert got is not None and got.task_id == "t1"


def test_pull_with_no_task_returns_none_after_waiting(broker: Broker) -> None:
    sa = broker.connect("site-a")
    assert broker.pull("site-a", sa, wait_s=0.05) is None


def test_a_waiting_pull_wakes_for_a_dispatch(broker: Broker) -> None:
    sa = broker.connect("site-a")
    got: list[TaskAssignment | None] = []
    puller = threading.Thread(target=lambda: got.append(broker.pull("site-a", sa, wait_s=10)))
    puller.start()
    time.sleep(0.05)
    dispatch(broker, "site-a", task("t1"), MODEL)
    puller.join(timeout=10)
    assert not puller.is_alive()
    assert got and got[0] is not None and got[0].task_id == "t1"


def test_unknown_session_is_refused(broker: Broker) -> None:
    broker.connect("site-a")
    dispatch(broker, "site-a", task("t1"), MODEL)
    with pytest.raises(PermissionDeniedError):
        broker.pull("site-a", "not-a-session", wait_s=0)
    with pytest.raises(PermissionDeniedError):
        broker.pull("site-never-registered", "whatever", wait_s=0)
    assert not broker.seen("site-a", "not-a-session")


def test_another_sites_session_is_refused(broker: Broker) -> None:
    broker.connect("site-a")
    sb = broker.connect("site-b")
    dispatch(broker, "site-a", task("t1"), MODEL)
    with pytest.raises(PermissionDeniedError):
        broker.pull("site-a", sb, wait_s=0)


def test_an_old_session_is_refused_after_reconnect(broker: Broker) -> None:
    old = broker.connect("site-a")
    new = broker.connect("site-a")
    assert old != new
    with pytest.raises(PermissionDeniedError):
        broker.pull("site-a", old, wait_s=0)
    assert not broker.seen("site-a", old)
    assert broker.seen("site-a", new, state="training")
    presence = broker.presence("site-a")
    assert presence is not None and presence[1] == "training"


# ------------------------------------------------------------------ ownership


def test_another_site_cannot_touch_a_task(broker: Broker) -> None:
    sa = broker.connect("site-a")
    broker.connect("site-b")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    assert broker.pull("site-a", sa, wait_s=0) is not None

    with pytest.raises(PermissionDeniedError):
        broker.model("site-b", "t1")
    with pytest.raises(PermissionDeniedError):
        broker.push_update(meta("site-b", "t1"), DELTA)
    with pytest.raises(PermissionDeniedError):
        broker.report_failure(TaskFailure("site-b", "t1", "INTERNAL", "sabotage"))
    assert results.empty()

    # The owner still can answer.
    broker.push_update(meta("site-a", "t1"), DELTA)
    res = only_result(results)
    assert isinstance(res, UpdateResult)
    assert res.meta.site_id == "site-a"
    assert res.payload.read_all() == DELTA


def test_unknown_task_is_not_found(broker: Broker) -> None:
    broker.connect("site-a")
    with pytest.raises(NotFoundError):
        broker.model("site-a", "nope")
    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "nope"), DELTA)
    with pytest.raises(NotFoundError):
        broker.report_failure(TaskFailure("site-a", "nope", "INTERNAL", "x"))


def test_report_failure_reaches_the_round(broker: Broker) -> None:
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    broker.pull("site-a", sa, wait_s=0)
    broker.report_failure(TaskFailure("site-a", "t1", "FAILED_PRECONDITION", "over budget"))
    res = only_result(results)
    assert isinstance(res, FailureResult)
    assert res.failure == TaskFailure("site-a", "t1", "FAILED_PRECONDITION", "over budget")
    # Answered: a second answer is refused.
    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "t1"), DELTA)


def test_an_answered_task_takes_no_second_update(broker: Broker) -> None:
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    broker.pull("site-a", sa, wait_s=0)
    broker.push_update(meta("site-a", "t1"), DELTA)
    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "t1"), DELTA)
    with pytest.raises(NotFoundError):
        broker.model("site-a", "t1")
    assert isinstance(only_result(results), UpdateResult)


@pytest.mark.parametrize("size", [len(DELTA) - 1, len(DELTA) + 1, 0])
def test_push_update_with_a_size_other_than_the_header_is_rejected(
    broker: Broker, size: int
) -> None:
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    broker.pull("site-a", sa, wait_s=0)
    with pytest.raises(InvalidSpecError, match="bytes"):
        broker.push_update(meta("site-a", "t1", size=size), DELTA)
    assert results.empty()
    # The task is still open: a correct push goes through.
    broker.push_update(meta("site-a", "t1"), DELTA)
    assert isinstance(only_result(results), UpdateResult)


# ------------------------------------------------------------------ losing sites


def test_reconnect_fails_delivered_unanswered_tasks(broker: Broker) -> None:
    sa = broker.connect("site-a")
    delivered = dispatch(broker, "site-a", task("t1"), MODEL)
    assert broker.pull("site-a", sa, wait_s=0) is not None
    waiting = dispatch(broker, "site-a", task("t2"), MODEL)  # not yet pulled
    other = dispatch(broker, "site-b", task("t3"), MODEL)

    new = broker.connect("site-a")  # the agent restarted

    res = only_result(delivered)
    assert isinstance(res, FailureResult)
    assert res.failure.site_id == "site-a"
    assert res.failure.task_id == "t1"
    assert res.failure.code == "UNAVAILABLE"
    assert "restart" in res.failure.reason
    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "t1"), DELTA)
    # A task the old session never took is handed to the new one.
    assert waiting.empty()
    got = broker.pull("site-a", new, wait_s=0)
    assert got is not None and got.task_id == "t2"
    assert other.empty()


def test_reconnect_without_tasks_fails_nothing(broker: Broker) -> None:
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    broker.pull("site-a", sa, wait_s=0)
    broker.push_update(meta("site-a", "t1"), DELTA)
    broker.connect("site-a")
    assert isinstance(only_result(results), UpdateResult)


def test_check_liveness_fails_tasks_of_silent_sites() -> None:
    broker = Broker(offline_after_s=0.05)
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    never = dispatch(broker, "site-x", task("tx"), MODEL)  # never connected
    assert broker.pull("site-a", sa, wait_s=0) is not None
    time.sleep(0.2)
    assert not broker.online("site-a")

    broker.check_liveness(["t1", "tx", "unknown-task"])

    for q, tid, site in ((results, "t1", "site-a"), (never, "tx", "site-x")):
        res = only_result(q)
        assert isinstance(res, FailureResult)
        assert (res.failure.site_id, res.failure.task_id) == (site, tid)
        assert res.failure.code == "UNAVAILABLE"
    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "t1"), DELTA)
    # Checking again adds nothing.
    broker.check_liveness(["t1", "tx"])
    assert results.empty() and never.empty()


def test_check_liveness_spares_live_sites(broker: Broker) -> None:
    sa = broker.connect("site-a")
    results = dispatch(broker, "site-a", task("t1"), MODEL)
    broker.pull("site-a", sa, wait_s=0)
    assert broker.online("site-a")
    broker.check_liveness(["t1"])
    assert results.empty()
    broker.push_update(meta("site-a", "t1"), DELTA)
    assert isinstance(only_result(results), UpdateResult)


def test_check_liveness_only_touches_the_listed_tasks() -> None:
    broker = Broker(offline_after_s=0.05)
    broker.connect("site-a")
    listed = dispatch(broker, "site-a", task("t1"), MODEL)
    unlisted = dispatch(broker, "site-a", task("t2"), MODEL)
    time.sleep(0.2)
    broker.check_liveness(["t1"])
    assert isinstance(only_result(listed), FailureResult)
    assert unlisted.empty()


# ------------------------------------------------------------------ cancel


def test_cancel_makes_late_answers_not_found(broker: Broker) -> None:
    sa = broker.connect("site-a")
    delivered = dispatch(broker, "site-a", task("t1"), MODEL)
    queued = dispatch(broker, "site-a", task("t2"), MODEL)
    assert broker.pull("site-a", sa, wait_s=0) is not None

    broker.cancel(["t1", "t2", "never-existed"])

    with pytest.raises(NotFoundError):
        broker.push_update(meta("site-a", "t1"), DELTA)
    with pytest.raises(NotFoundError):
        broker.report_failure(TaskFailure("site-a", "t1", "INTERNAL", "late"))
    with pytest.raises(NotFoundError):
        broker.model("site-a", "t1")
    # The queued task is withdrawn, and cancelled tasks produce no result.
    assert broker.pull("site-a", sa, wait_s=0) is None
    assert delivered.empty() and queued.empty()
    # A cancelled task is no longer the session's: a restart fails nothing.
    broker.connect("site-a")
    assert delivered.empty()


def test_results_of_a_round_share_one_queue(broker: Broker) -> None:
    sa = broker.connect("site-a")
    sb = broker.connect("site-b")
    results: queue.Queue[Result] = queue.Queue()
    broker.dispatch_into("site-a", task("ta"), MODEL, results)
    broker.dispatch_into("site-b", task("tb"), MODEL, results)
    broker.pull("site-a", sa, wait_s=0)
    broker.pull("site-b", sb, wait_s=0)
    broker.push_update(meta("site-b", "tb"), DELTA)
    broker.report_failure(TaskFailure("site-a", "ta", "INTERNAL", "oom"))
    got = [results.get(timeout=5), results.get(timeout=5)]
    assert results.empty()
    assert {type(r) for r in got} == {UpdateResult, FailureResult}
