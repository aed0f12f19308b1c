"""Uploads wait for room in their round, so queued models do not grow with the site count."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from common.domain import TaskAssignment
from common.errors import NotFoundError
from orchestrator.broker import Broker, Result


def _task(i: int) -> TaskAssignment:
    return TaskAssignment(
        task_id=f"t{i}",
        job_id="j",
        round=1,
        rounds=1,
        job_spec_json="{}",
        dataset="d",
        noise_multiplier=1.0,
        model_size=0,
        model_sha256="",
        deadline_unix=0.0,
    )


def test_an_upload_waits_while_the_round_holds_enough_unfolded_updates() -> None:
    broker = Broker()
    results: queue.Queue[Result] = queue.Queue()
    for i in range(3):
        broker.connect(f"s{i}")
        broker.dispatch_into(f"s{i}", _task(i), b"", results)
    results.put("a")  # type: ignore[arg-type]  # two results already waiting in the round
    results.put("b")  # type: ignore[arg-type]
    done = threading.Event()

    def upload() -> None:
        broker.wait_for_capacity("s2", "t2", limit=2, timeout_s=10)
        done.set()

    # an upload being read counts too: reserve, then two queued → a third must wait

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()  # held back while the round has 2 unfolded results
    results.get()  # the round folds one
    t.join(timeout=5)
    assert done.is_set()


def test_an_upload_for_a_finished_round_is_refused() -> None:
    broker = Broker()
    results: queue.Queue[Result] = queue.Queue()
    broker.connect("s0")
    broker.dispatch_into("s0", _task(0), b"", results)
    broker.cancel(["t0"])
    with pytest.raises(NotFoundError):
        broker.wait_for_capacity("s0", "t0", limit=1, timeout_s=1)


def test_uploads_being_read_count_against_the_limit() -> None:
    broker = Broker()
    results: queue.Queue[Result] = queue.Queue()
    for i in range(3):
        broker.connect(f"s{i}")
        broker.dispatch_into(f"s{i}", _task(i), b"", results)
    t0 = broker.wait_for_capacity("s0", "t0", limit=2, timeout_s=10)
    broker.wait_for_capacity("s1", "t1", limit=2, timeout_s=10)
    done = threading.Event()
    th = threading.Thread(
        target=lambda: (broker.wait_for_capacity("s2", "t2", limit=2, timeout_s=10), done.set())
    )
    th.start()
    time.sleep(0.2)
    assert not done.is_set()  # two uploads in flight, none queued yet: the third waits
    broker.release_capacity(t0)
    th.join(timeout=5)
    assert done.is_set()
