"""One task to each of several sites, results collected until all answered or a deadline:
the shape of every non-training request (federated evaluation, synthetic-data marginals,
mixture statistics). No gRPC here: the broker stands between."""

from __future__ import annotations

import hashlib
import queue
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from common.domain import TaskAssignment, TaskFailure
from orchestrator.core.broker import Broker, FailureResult, Result, UpdateResult


@dataclass
class FanOutResult:
    updates: dict[str, UpdateResult] = field(default_factory=dict)
    failures: dict[str, TaskFailure] = field(default_factory=dict)


def fan_out(
    broker: Broker,
    *,
    site_ids: list[str],
    job_id: str,
    kind: str,
    dataset: str,
    request_json: str,
    blob: bytes = b"",
    timeout_s: float = 300.0,
    poll_s: float = 0.5,
    round_: int = 1,
    rounds: int = 1,
    job_spec_json: str = "",
    check: Callable[[], None] | None = None,
    noise_multipliers: Mapping[str, float] | None = None,
    task_ids: Mapping[str, str] | None = None,
) -> FanOutResult:
    """Dispatch ``kind`` with the same request to every site; a site that does not answer
    in time is a failure. ``check`` runs at every poll and may raise to abandon the fan-out
    (a job's cancellation or shutdown); the unanswered tasks are then withdrawn.
    ``noise_multipliers`` gives each site its assigned σ (admission); 0 otherwise.
    ``task_ids``: each site's task id, where the caller recorded it ahead (a charge written
    before dispatch); a fresh one otherwise."""
    sha = hashlib.sha256(blob).hexdigest()
    deadline = time.time() + timeout_s
    results: queue.Queue[Result] = queue.Queue()
    outstanding: dict[str, str] = {}
    for sid in site_ids:
        task = TaskAssignment(
            task_id=(task_ids or {}).get(sid) or uuid.uuid4().hex,
            job_id=job_id,
            round=round_,
            rounds=rounds,
            job_spec_json=job_spec_json,
            dataset=dataset,
            noise_multiplier=(noise_multipliers or {}).get(sid, 0.0),
            model_size=len(blob),
            model_sha256=sha,
            deadline_unix=deadline,
            kind=kind,
            request_json=request_json,
        )
        outstanding[task.task_id] = sid
        broker.dispatch_into(sid, task, blob, results)
    out = FanOutResult()
    try:
        while outstanding and time.time() < deadline:
            if check is not None:
                check()
            try:
                res = results.get(timeout=poll_s)
            except queue.Empty:
                broker.check_liveness(list(outstanding))
                continue
            if isinstance(res, FailureResult):
                if res.failure.task_id in outstanding:
                    out.failures[outstanding.pop(res.failure.task_id)] = res.failure
            elif res.meta.task_id in outstanding:
                out.updates[outstanding.pop(res.meta.task_id)] = res
    finally:
        broker.cancel(list(outstanding))
    for tid, sid in outstanding.items():
        out.failures[sid] = TaskFailure(
            site_id=sid,
            task_id=tid,
            code="DEADLINE_EXCEEDED",
            reason=f"no answer within {timeout_s:g} s",
        )
    return out
