"""Hands tasks to dialled-in agents and their results back to the round that asked.

Agents open no port: they long-poll :meth:`Broker.pull`. A round dispatches one task per
selected site with :meth:`Broker.dispatch_into` and reads results (updates or failures) from
its own queue. A site may only fetch the model of, and answer, a task addressed to it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.domain import TaskAssignment, TaskFailure, UpdateMeta
from common.errors import (
    InvalidSpecError,
    NotFoundError,
    PermissionDeniedError,
    TryLaterError,
    UnavailableError,
)
from orchestrator.core.spool import Payload
from orchestrator.core.turns import TurnLine


@dataclass(frozen=True)
class UpdateResult:
    meta: UpdateMeta
    payload: Payload  # the round closes it once the update is folded or rejected


@dataclass(frozen=True)
class FailureResult:
    failure: TaskFailure


Result = UpdateResult | FailureResult

MAX_DOWNLOADS = 8
"""Default number of model downloads (``FetchModel`` streams) served at once."""

MAX_UPLOADS = 4
"""Default number of updates a round takes at once, being read or queued to be folded. The one
update the round is folding has left its queue and is not counted: at most MAX_UPLOADS + 1
updates per round are spooled (``orchestrator.core.spool``: on disk, one chunk of memory each)."""


@dataclass
class _Pending:
    assignment: TaskAssignment
    site_id: str
    model: Payload  # what FetchModel streams; shared by the round's tasks
    results: queue.Queue[Result]
    delivered: bool = False


@dataclass
class _Presence:
    session_id: str
    last_seen: float
    state: str = "idle"
    delivered: set[str] = field(default_factory=set)


class Broker:
    def __init__(self, *, offline_after_s: float = 30.0) -> None:
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)  # long-polls wait on it
        self._queues: dict[str, deque[str]] = {}
        self._pending: dict[str, _Pending] = {}
        self._presence: dict[str, _Presence] = {}
        self._admitted: dict[int, int] = {}  # uploads being read, per round queue
        self._upload_lines: dict[int, TurnLine] = {}  # uploads waiting, per round queue
        self.max_downloads = MAX_DOWNLOADS
        self.max_uploads = MAX_UPLOADS
        self._downloads = 0
        # Downloads have a lock of their own, so a download that ends does not contend with
        # the long-polls. Lock order: _lock, then _downloads_lock.
        self._downloads_lock = threading.Lock()
        self._download_line = TurnLine()
        self.offline_after_s = offline_after_s
        # A site that has not dialled in since this broker started is given offline_after_s
        # from the start, as if seen then: after an orchestrator restart the agents come back
        # with backoff, and failing their resumed tasks at once would drop them for a round.
        self._started = time.time()
        self._closed = False

    def close(self) -> None:
        """Shutdown: refuse results (and pulls) from now on.

        The orchestrator closes the broker before it stops its rounds, so a round that stops
        finds in its queue every update the broker ever acknowledged, and records it. An agent
        that pushes later is told UNAVAILABLE (its charge stays in its own ledger) instead of
        "received" for an update that nobody would read.
        """
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise UnavailableError("the orchestrator is shutting down")

    # ------------------------------------------------------------ presence

    def connect(self, site_id: str) -> str:
        """A (re-)registration. Tasks the site's previous session had taken are lost with it."""
        session_id = uuid.uuid4().hex
        with self._cv:
            old = self._presence.get(site_id)
            self._presence[site_id] = _Presence(session_id=session_id, last_seen=time.time())
            if old is not None:
                for task_id in list(old.delivered):
                    self._fail_locked(
                        task_id, "UNAVAILABLE", "the site agent restarted while running the task"
                    )
            self._queues.setdefault(site_id, deque())
            self._cv.notify_all()
        return session_id

    def disconnect(self, site_id: str) -> None:
        """Forget a site's session (disabled by an operator): its tasks fail, pulls are refused."""
        with self._cv:
            old = self._presence.pop(site_id, None)
            if old is not None:
                for task_id in list(old.delivered):
                    self._fail_locked(task_id, "PERMISSION_DENIED", "the site was disabled")
            for tid in list(self._queues.get(site_id, ())):
                self._fail_locked(tid, "PERMISSION_DENIED", "the site was disabled")
            self._queues.pop(site_id, None)
            self._cv.notify_all()

    def seen(self, site_id: str, session_id: str, *, state: str | None = None) -> bool:
        """Record a sign of life; False when the session is unknown (re-register)."""
        with self._cv:
            p = self._presence.get(site_id)
            if p is None or p.session_id != session_id:
                return False
            p.last_seen = time.time()
            if state is not None:
                p.state = state
            return True

    def online(self, site_id: str) -> bool:
        with self._cv:
            p = self._presence.get(site_id)
            return p is not None and time.time() - p.last_seen <= self.offline_after_s

    def presence(self, site_id: str) -> tuple[float, str] | None:
        with self._cv:
            p = self._presence.get(site_id)
            return None if p is None else (p.last_seen, p.state)

    # ------------------------------------------------------------ rounds side

    def dispatch_into(
        self,
        site_id: str,
        assignment: TaskAssignment,
        model: Payload | bytes,
        results: queue.Queue[Result],
    ) -> None:
        """Queue ``assignment`` for ``site_id``; its site fetches ``model`` (bytes, or a
        payload that a round spooled to disk and shares between its tasks)."""
        if isinstance(model, bytes):
            model = Payload.from_bytes(model)
        with self._cv:
            self._pending[assignment.task_id] = _Pending(assignment, site_id, model, results)
            self._queues.setdefault(site_id, deque()).append(assignment.task_id)
            self._cv.notify_all()

    def cancel(self, task_ids: list[str]) -> None:
        """Forget tasks whose round is over; late answers are refused."""
        with self._cv:
            for tid in task_ids:
                p = self._pending.pop(tid, None)
                if p is not None:
                    self._leave_lines_locked(tid, p)
                    q = self._queues.get(p.site_id)
                    if q is not None and tid in q:
                        q.remove(tid)
                    pres = self._presence.get(p.site_id)
                    if pres is not None:
                        pres.delivered.discard(tid)

    def check_liveness(self, task_ids: list[str]) -> None:
        """Fail the tasks whose site has gone silent, so a round need not wait its deadline."""
        now = time.time()
        with self._cv:
            for tid in task_ids:
                p = self._pending.get(tid)
                if p is None:
                    continue
                pres = self._presence.get(p.site_id)
                last_seen = self._started if pres is None else pres.last_seen
                if now - last_seen > self.offline_after_s:
                    self._fail_locked(tid, "UNAVAILABLE", "the site stopped answering (offline)")

    # ------------------------------------------------------------ agent side

    def pull(self, site_id: str, session_id: str, *, wait_s: float) -> TaskAssignment | None:
        deadline = time.time() + max(0.0, min(wait_s, 60.0))
        with self._cv:
            while True:
                self._refuse_if_closed()
                pres = self._presence.get(site_id)
                if pres is None or pres.session_id != session_id:
                    raise PermissionDeniedError(
                        f"site {site_id!r} has no live session; register first"
                    )
                pres.last_seen = time.time()
                q = self._queues.setdefault(site_id, deque())
                while q:
                    tid = q.popleft()
                    p = self._pending.get(tid)
                    if p is not None:
                        p.delivered = True
                        pres.delivered.add(tid)
                        return p.assignment
                remaining = deadline - time.time()
                if remaining <= 0:
                    return None
                self._cv.wait(timeout=remaining)

    def model(self, site_id: str, task_id: str) -> Payload:
        with self._cv:
            return self._owned(site_id, task_id).model

    @contextlib.contextmanager
    def download_slot(self, site_id: str, task_id: str) -> Iterator[Payload]:
        """Backpressure for downloads: hold one of ``max_downloads`` places while a task's
        model is streamed to its site; yields the model.

        Each download in flight holds a chunk at every stage of gRPC's send path
        (``blob_to_chunks``'s slice, the protobuf message, its serialization, the C-core's
        copy waiting for the socket), and its worker thread's malloc arena keeps what it
        freed; unbounded, that grows with the number of sites fetching at once. The model
        itself is one shared payload (a training round's lies in a spool file). Downloads
        take turns first come, first served (``orchestrator.core.turns``): without a place,
        raises TryLaterError with the time to ask again, and the task keeps its place in line.
        Raises NotFoundError when the task's round ended, PermissionDeniedError when the task
        is another site's.
        """
        self.model(site_id, task_id)  # unknown or foreign tasks fail before taking a place
        with self._downloads_lock:
            retry = self._download_line.ask(task_id, max(1, self.max_downloads) - self._downloads)
            if retry is not None:
                raise TryLaterError("every download place is taken; ask again", retry_after_s=retry)
            self._downloads += 1
        try:
            yield self.model(site_id, task_id)
        finally:
            with self._downloads_lock:
                self._downloads -= 1

    def downloads_in_progress(self) -> int:
        with self._downloads_lock:
            return self._downloads

    def wait_for_capacity(self, site_id: str, task_id: str, *, limit: int | None = None) -> int:
        """Backpressure for uploads: reserve one of ``limit`` (default :attr:`max_uploads`)
        places in the task's round (updates queued for the round's fold, plus uploads being
        read; the one the round is folding has left the queue and is not counted) before
        reading an upload's bytes. Returns a token for :meth:`release_capacity`.

        The round folds updates into its running sum one at a time; without this, many sites
        pushing at once would park one full model per site in the spool (and, as gRPC
        buffers, in memory), so the orchestrator's resources would grow with the number of
        sites. gRPC flow control alone does not hold a waiting upload back: once its
        bandwidth-delay probing has grown the windows, a stream may send ~4 MiB unread. The
        servicer therefore sends the agent its go (``common.rpc.transport.UPLOAD_GATE``) only
        after this returns.

        Uploads take turns first come, first served (``orchestrator.core.turns``): when the
        round has no room yet, raises TryLaterError with the time to ask again, and the task
        keeps its place in line. Raises NotFoundError when the round ended.
        """
        limit = self.max_uploads if limit is None else limit
        with self._lock:
            # NotFoundError once the round is over; cancel() took the task out of the line.
            p = self._owned(site_id, task_id)
            key = id(p.results)
            line = self._upload_lines.setdefault(key, TurnLine())
            busy = p.results.qsize() + self._admitted.get(key, 0)
            retry = line.ask(task_id, limit - busy)
            if retry is not None:
                raise TryLaterError(
                    "the round holds as many updates as it may; ask again", retry_after_s=retry
                )
            self._leave_upload_line(task_id, key)
            self._admitted[key] = self._admitted.get(key, 0) + 1
            return key

    def uploads_waiting(self) -> int:
        with self._lock:
            return sum(len(line) for line in self._upload_lines.values())

    def downloads_waiting(self) -> int:
        with self._downloads_lock:
            return len(self._download_line)

    def release_capacity(self, token: int) -> None:
        """The upload holding ``token`` is queued in its round (or failed): free its place."""
        with self._lock:
            left = self._admitted.get(token, 0) - 1
            if left > 0:
                self._admitted[token] = left
            else:
                self._admitted.pop(token, None)

    def push_update(self, meta: UpdateMeta, payload: Payload | bytes) -> None:
        if isinstance(payload, bytes):
            payload = Payload.from_bytes(payload)
        with self._cv:
            self._refuse_if_closed()
            p = self._owned(meta.site_id, meta.task_id)
            if payload.size != meta.total_size:
                raise InvalidSpecError(
                    f"update for task {meta.task_id} has {payload.size} bytes, "
                    f"header announced {meta.total_size}"
                )
            self._finish_locked(meta.task_id)
            p.results.put(UpdateResult(meta=meta, payload=payload))

    def report_failure(self, failure: TaskFailure) -> None:
        with self._cv:
            self._refuse_if_closed()
            self._owned(failure.site_id, failure.task_id)
            self._fail_locked(failure.task_id, failure.code, failure.reason)

    # ------------------------------------------------------------ internals

    def _owned(self, site_id: str, task_id: str) -> _Pending:
        p = self._pending.get(task_id)
        if p is None:
            raise NotFoundError(f"task {task_id!r} is unknown or its round is over")
        if p.site_id != site_id:
            raise PermissionDeniedError(f"task {task_id!r} is not addressed to site {site_id!r}")
        return p

    def _finish_locked(self, task_id: str) -> _Pending | None:
        p = self._pending.pop(task_id, None)
        if p is not None:
            pres = self._presence.get(p.site_id)
            if pres is not None:
                pres.delivered.discard(task_id)
            self._leave_lines_locked(task_id, p)
        return p

    def _leave_lines_locked(self, task_id: str, p: _Pending) -> None:
        """A task that is over gives up its places in the transfer lines."""
        self._leave_upload_line(task_id, id(p.results))
        with self._downloads_lock:
            self._download_line.leave(task_id)

    def _leave_upload_line(self, task_id: str, key: int) -> None:
        line = self._upload_lines.get(key)
        if line is not None:
            line.leave(task_id)
            if not line:
                del self._upload_lines[key]

    def _fail_locked(self, task_id: str, code: str, reason: str) -> None:
        p = self._finish_locked(task_id)
        if p is not None:
            p.results.put(
                FailureResult(
                    TaskFailure(site_id=p.site_id, task_id=task_id, code=code, reason=reason)
                )
            )
